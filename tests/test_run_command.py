"""`make run`'s command, `python -m serve_app.run CONFIG`, serves and stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import yaml

from tests.conftest import ROOT, _free_port, load_config


def wait_until_serving(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited before serving"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)  # polling a condition, bounded by the deadline
    pytest.fail(f"{url} did not answer within {timeout_s} s")


def stop_with_sigterm(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)


def stop_with_ctrl_c(process: subprocess.Popen) -> None:
    # A terminal's Ctrl-C signals the whole foreground process group.
    os.killpg(process.pid, signal.SIGINT)


@pytest.mark.parametrize("stop", [stop_with_sigterm, stop_with_ctrl_c], ids=["SIGTERM", "Ctrl-C"])
def test_serve_run_stops_cleanly_leaving_no_ray_process(tmp_path, stop):
    port = _free_port()
    config = load_config("test.yaml")
    config["http_options"]["port"] = port
    app = config["applications"][0]
    # Only the weights-free model, so this needs no tiny-model files.
    app["args"]["segmentation"] = {"classic": {"engine": "classic"}}
    app["args"]["default_model"] = "classic"
    app["args"]["layered"] = {}
    app["args"]["default_layer_model"] = None
    app["args"]["jobs"]["data_dir"] = str(tmp_path / "data")
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("Ingress", "classic")]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    # RAY_ADDRESS=local: a Ray of its own, not the test session's cluster.
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"}
    process = subprocess.Popen([sys.executable, "-m", "serve_app.run", str(config_path)],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/healthz", process)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/health").json()["models"]["classic"]["engine"] == "classic"
        ray_processes = psutil.Process(process.pid).children(recursive=True)
        assert ray_processes, "serve run started no Ray processes"
        stop(process)
        assert process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(ray_processes, timeout=30)
        assert alive == [], f"left behind: {[p.info for p in alive]}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
