"""`make run`'s command, `python -m serve_app.run CONFIG`, serves and stops cleanly."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from PIL import Image

from serve_app.run import CPU_MODEL_MEMORY_ENV, MEMORY_ENV, SERVING_ENV, spare_serve_ports
from serve_app.haproxy_overrides import state_dirs_serving
from serve_app.serve_session import RunRecord, port_in_use
from tests.conftest import ROOT, _free_port, load_config
from tests.images import product_photo
from tests.test_remove_background_api import jpeg_bytes


def wait_until_healthy(base: str, process: subprocess.Popen, timeout_s: float = 180) -> dict:
    """/v1/health once every model answers (polling a condition, bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited before serving"
        try:
            response = httpx.get(f"{base}/v1/health", timeout=30)
            if response.status_code == 200 and response.json()["status"] == "ok":
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{base} was not healthy within {timeout_s} s")


def start_make_run(tmp_path, config: dict) -> tuple[subprocess.Popen, str]:
    """`make run`'s command serving `config` on a free port with its own data: the
    process (leader of its own process group) and the base URL."""
    port = _free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["jobs"]["data_dir"] = str(tmp_path / "data")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # RAY_ADDRESS=local: a Ray of its own (sized by this machine), not the test
    # session's cluster. HF_HUB_OFFLINE: no weights here, deterministically.
    # Without the serving environment, which the test session sets: `make run` sets it itself.
    env = {**{k: v for k, v in os.environ.items() if k not in SERVING_ENV},
           "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **spare_serve_ports()}
    # What a terminal would show, in a file (a pipe nobody reads would fill and block it).
    with output_path(tmp_path).open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "serve_app.run", str(config_path)],
                                   cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def output_path(tmp_path) -> Path:
    """Where `start_make_run` writes what the command prints."""
    return tmp_path / "make-run.out"


def wait_for_line(tmp_path, process: subprocess.Popen, start: str, timeout_s: float = 180) -> list[str]:
    """The command's output lines once one starts with `start` (polling, bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = output_path(tmp_path).read_text(errors="replace").splitlines()
        if any(line.startswith(start) for line in lines):
            return lines
        assert process.poll() is None, "the server exited before printing " + start
        time.sleep(0.5)
    pytest.fail(f"no line starting {start!r} within {timeout_s} s")


def assert_stops_cleanly(process: subprocess.Popen, stop: Callable[[subprocess.Popen], None]) -> None:
    """`stop` ends the server with exit status 0 and leaves none of its processes behind."""
    ray_processes = psutil.Process(process.pid).children(recursive=True)
    assert ray_processes, "serve run started no Ray processes"
    stop(process)
    assert process.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert alive == [], f"left behind: {alive}"


def test_make_run_serves_local_yaml_through_haproxy_and_stops_on_sigterm(tmp_path):
    # configs/local.yaml as `make run` serves it. SIGTERM: what `kill`, systemd and make send.
    config = load_config("local.yaml")
    process, base = start_make_run(tmp_path, config)
    port = config["http_options"]["port"]
    try:
        health = wait_until_healthy(base, process)
        assert health["models"]["birefnet"]["engine"] == "classic"
        assert "ZhengPeng7/BiRefNet" in health["models"]["birefnet"]["fallback_reason"]
        assert health["layer_models"]["qwen-image-layered"]["engine"] == "classic"
        rgb, _ = product_photo(400, 300)
        response = httpx.post(f"{base}/v1/remove-background?model=birefnet", timeout=60,
                              files={"image": ("photo.jpg", jpeg_bytes(rgb), "image/jpeg")})
        assert response.status_code == 200 and response.headers["x-engine"] == "classic"
        assert Image.open(io.BytesIO(response.content)).mode == "RGBA"

        ray_processes = psutil.Process(process.pid).children(recursive=True)
        # Serve's fast request path (serve_app.run.SERVING_ENV): HAProxy holds the port.
        listeners = {c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert {p.name() for p in ray_processes if p.pid in listeners} == {"haproxy"}
        # ... and the replicas run under its memory settings (read when a process starts),
        # the background-removal ones (on CPU here) under their own on top (serve_app.app).
        segmenters = set(config["applications"][0]["args"]["segmentation"])
        replicas = []
        for child in ray_processes:
            try:
                cmdline = child.cmdline()
            except psutil.NoSuchProcess:  # a short-lived Ray worker, gone since the listing
                continue
            if cmdline[:1] and cmdline[0].startswith("ray::ServeReplica"):
                replicas.append((cmdline[0].strip().rsplit(":", 1)[1], child))
        assert {deployment for deployment, _ in replicas} >= segmenters | {"Ingress"}
        for deployment, replica in replicas:
            expected = {**MEMORY_ENV, **CPU_MODEL_MEMORY_ENV} if deployment in segmenters else MEMORY_ENV
            assert expected.items() <= replica.environ().items(), deployment
        assert_stops_cleanly(process, lambda server: server.send_signal(signal.SIGTERM))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def local_yaml_with_one_model(name: str) -> dict:
    """configs/local.yaml serving only its segmentation model `name` and the classic layer model."""
    config = load_config("local.yaml")
    args = config["applications"][0]["args"]
    args.update(default_model=name, segmentation={name: args["segmentation"][name]},
                default_layer_model="classic", layered={"classic": {"engine": "classic"}})
    args.pop("compat")
    app = config["applications"][0]
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("Ingress", name)]
    return config


def test_make_run_says_when_it_is_ready_and_which_models_fell_back(tmp_path):
    # Under Serve's fast path the replicas log to files only: the terminal has this line.
    # local.yaml's birefnet falls back to classic here (no weights, offline).
    process, base = start_make_run(tmp_path, local_yaml_with_one_model("birefnet"))
    try:
        lines = wait_for_line(tmp_path, process, "Strata is ready at")
        assert f"Strata is ready at {base} (models: birefnet; layer models: classic)" in lines
        fallback = [line for line in lines if line.startswith("  birefnet serves the classic engine instead: ")]
        assert len(fallback) == 1 and "ZhengPeng7/BiRefNet" in fallback[0]
        # ... what the engine serving instead is for, and is not for, and how to serve the real one.
        lines = wait_for_line(tmp_path, process, "  (to serve the real models: ")
        (about,) = [line for line in lines if line.startswith("  (birefnet: the classic engine is weights-free")]
        assert "plain or gradient backdrops" in about and "not for photos" in about
        (setup,) = [line for line in lines if line.startswith("  (to serve the real models: ")]
        assert "scripts/fetch_models.py" in setup and "On a GPU box" in setup and f"{base}/setup" in setup
        # Ready means ready: the first request after the line is served.
        assert httpx.get(f"{base}/v1/health", timeout=30).json()["status"] == "ok"
        assert_stops_cleanly(process, lambda server: server.send_signal(signal.SIGTERM))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def one_place(tmp_path_factory) -> dict:
    """One port, one set of Serve's fixed ports and one data directory for every start
    of the stop tests: each start then also proves the stop before it freed them all."""
    return {"port": _free_port(), "serve_ports": spare_serve_ports(),
            "data_dir": tmp_path_factory.mktemp("one-place-data")}


def start_in_one_place(tmp_path, place: dict, through_make: bool = False,
                       **sections: dict) -> tuple[subprocess.Popen, str]:
    """`make run`'s command (or `make run` itself) serving local.yaml's classic models
    on `place`'s ports and data: the process (leader of its own group) and the base URL.
    `sections` update sections of the app's args (e.g. limits={"upload_timeout_s": 2})."""
    config = local_yaml_with_one_model("classic")
    for section, settings in sections.items():
        config["applications"][0]["args"][section].update(settings)
    config["http_options"]["port"] = place["port"]
    config["applications"][0]["args"]["jobs"]["data_dir"] = str(place["data_dir"])
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**{k: v for k, v in os.environ.items() if k not in SERVING_ENV},
           "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **place["serve_ports"]}
    command = [sys.executable, "-m", "serve_app.run", str(config_path)]
    if through_make:
        # This environment's Python as make's venv; -o: never reinstall it.
        venv = Path(sys.prefix)
        command = ["make", "-s", "-o", str(venv / ".installed"), "run", f"VENV={venv}", f"CONFIG={config_path}"]
    with output_path(tmp_path).open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, f"http://127.0.0.1:{place['port']}"


@contextlib.contextmanager
def serving_in_one_place(tmp_path, place: dict, cutout_after: bool = True,
                         **sections: dict) -> Iterator[tuple[subprocess.Popen, str]]:
    """`start_in_one_place`, once it serves; afterwards the service must still serve a
    cutout (unless told not to) and stop cleanly on SIGTERM, whatever the test did to it."""
    process, base = start_in_one_place(tmp_path, place, **sections)
    try:
        wait_until_healthy(base, process)
        yield process, base
        if cutout_after:
            serves_a_cutout(base)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def serves_a_cutout(base: str) -> None:
    rgb, _ = product_photo(320, 240)
    response = httpx.post(f"{base}/v1/remove-background", timeout=60,
                          files={"image": ("photo.jpg", jpeg_bytes(rgb), "image/jpeg")})
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).mode == "RGBA"


def recorded_run(place: dict) -> RunRecord:
    record = RunRecord.read(place["data_dir"] / "run.json")
    assert record is not None, "a serving launcher records its run"
    return record


def assert_nothing_left(record: RunRecord, place: dict) -> None:
    """No process of the run's session is alive and every port it took is free again."""
    _, alive = psutil.wait_procs(record.leftovers(), timeout=30)
    assert alive == [], f"left behind: {alive}"
    assert not port_in_use("127.0.0.1", place["port"])
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        assert not port_in_use("127.0.0.1", int(place["serve_ports"][name])), name
    # ... nor the state directory Ray's HAProxy kept for it.
    assert state_dirs_serving("/tmp/haproxy-serve", "127.0.0.1", place["port"], since=0) == []


# How each stop reaches the launcher: a terminal's Ctrl-C (the foreground group), kill,
# `timeout`/supervisors/CI (the whole group), a closed terminal.
STOPS = {
    "ctrl_c_to_the_group": lambda process: os.killpg(process.pid, signal.SIGINT),
    "sigterm_to_the_process": lambda process: process.send_signal(signal.SIGTERM),
    "sigterm_to_the_group": lambda process: os.killpg(process.pid, signal.SIGTERM),
    "sighup_to_the_group": lambda process: os.killpg(process.pid, signal.SIGHUP),
}


@pytest.mark.parametrize("stop", STOPS)
def test_a_stop_ends_every_process_and_frees_the_ports(tmp_path, one_place, stop):
    process, base = start_in_one_place(tmp_path, one_place)
    try:
        wait_until_healthy(base, process)
        serves_a_cutout(base)
        record = recorded_run(one_place)
        STOPS[stop](process)
        assert process.wait(timeout=90) == 0
        assert_nothing_left(record, one_place)
        assert not (one_place["data_dir"] / "run.json").exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_sigterm_to_make_alone_ends_every_process(tmp_path, one_place):
    # `kill <make's PID>`: make passes SIGTERM on to the launcher, then dies of it itself.
    process, base = start_in_one_place(tmp_path, one_place, through_make=True)
    try:
        wait_until_healthy(base, process)
        serves_a_cutout(base)
        record = recorded_run(one_place)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
        assert_nothing_left(record, one_place)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_a_start_after_a_sigkill_ends_what_the_killed_run_left_and_serves(tmp_path, one_place):
    first, base = start_in_one_place(tmp_path, one_place)
    second = None
    try:
        wait_until_healthy(base, first)
        record = recorded_run(one_place)
        # The launcher and serve run killed outright (the OOM killer, kill -9): Ray's
        # workers and HAProxy, in groups of their own, are left holding the ports.
        os.killpg(first.pid, signal.SIGKILL)
        os.kill(record.session_id, signal.SIGKILL)
        first.wait(timeout=30)
        assert record.leftovers(), "SIGKILL left nothing to clean up: the test proves nothing"

        second, base = start_in_one_place(tmp_path, one_place)
        lines = wait_for_line(tmp_path, second, "Ended ")
        assert any("an earlier run left behind (it was killed)" in line for line in lines), lines
        wait_until_healthy(base, second)
        serves_a_cutout(base)
        assert record.leftovers() == []
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=90) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def test_a_port_held_by_another_process_is_named_in_one_line(tmp_path, one_place):
    with socket.create_server(("127.0.0.1", one_place["port"])):  # the holder: this test itself
        process, _ = start_in_one_place(tmp_path, one_place)
        assert process.wait(timeout=60) == 1
    output = output_path(tmp_path).read_text()
    assert output.strip().splitlines() == [
        f"Port {one_place['port']} (Strata's HTTP API) on 127.0.0.1 is in use by PID {os.getpid()} "
        f"({psutil.Process().name()}), not by a run Strata recorded; free it with `kill {os.getpid()}`, "
        "or serve on another port."]
    assert "Traceback" not in output


def another_address_of_this_machine() -> str | None:
    """An IPv4 address of this machine's that is not loopback, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def answers(host: str, port: int, path: str) -> int | None:
    """The HTTP status of GET path on host:port, None when nothing listens there."""
    try:
        return httpx.get(f"http://{host}:{port}{path}", timeout=5).status_code
    except httpx.ConnectError:
        return None


def test_haproxys_stats_and_metrics_listen_on_the_configured_host_only(tmp_path, one_place):
    # Ray binds them on every interface; make run keeps them to http_options.host
    # (127.0.0.1 here) and HAProxy's admin socket to its owner (serve_app/haproxy_overrides.py).
    elsewhere = another_address_of_this_machine()
    if elsewhere is None:
        pytest.skip("this machine has no address but loopback to probe from")
    with serving_in_one_place(tmp_path, one_place):
        stats = int(one_place["serve_ports"]["RAY_SERVE_HAPROXY_STATS_PORT"])
        metrics = int(one_place["serve_ports"]["RAY_SERVE_HAPROXY_METRICS_PORT"])
        assert answers("127.0.0.1", stats, "/stats") == 200
        assert answers("127.0.0.1", metrics, "/metrics") == 200
        assert answers(elsewhere, stats, "/stats") is None
        assert answers(elsewhere, metrics, "/metrics") is None
        assert answers(elsewhere, one_place["port"], "/healthz") is None
        haproxies = [p for p in recorded_run(one_place).leftovers() if p.name() == "haproxy"]
        assert haproxies, "HAProxy serves"
        command = haproxies[-1].cmdline()
        config = Path(command[command.index("-f") + 1]).read_text()
        admin_socket = re.search(r"stats socket (\S+) mode", config).group(1)
        assert os.stat(admin_socket).st_mode & 0o777 == 0o600


def replicas_named(process: subprocess.Popen, title: str) -> list[psutil.Process]:
    """The processes under `process` whose title is `title` (short-lived workers that end
    while they are listed are skipped)."""
    found = []
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if child.cmdline()[:1] == [title]:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_connection_that_trickles_its_headers_is_closed_with_408_at_the_deadline(tmp_path, one_place):
    # HAProxy's `timeout http-request` (limits.upload_timeout_s, 2 s here): a slowloris
    # connection holds nothing past it.
    with serving_in_one_place(tmp_path, one_place, limits={"upload_timeout_s": 2}):
        with socket.create_connection(("127.0.0.1", one_place["port"]), timeout=30) as trickle:
            trickle.sendall(b"GET /healthz HTTP/1.1\r\nHost: strata\r\n")  # never the blank line
            started = time.monotonic()
            answer = trickle.recv(4096)
            waited = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
            assert trickle.recv(4096) == b""  # and the connection is closed
        assert 1.5 < waited < 20


def test_liveness_answers_while_the_ingress_itself_cannot(tmp_path, one_place):
    # The ingress replica frozen (SIGSTOP: as starved as a replica gets): /healthz is
    # answered by HAProxy while the replica was passing its health checks a moment ago.
    with serving_in_one_place(tmp_path, one_place) as (process, base):
        (ingress,) = replicas_named(process, "ray::ServeReplica:strata:Ingress")
        ingress.suspend()
        try:
            response = httpx.get(f"{base}/healthz", timeout=5)
        finally:
            ingress.resume()
        assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_each_client_address_has_its_own_rate_limit_behind_haproxy(tmp_path, one_place):
    # Two clients on two loopback addresses: HAProxy passes each one's address, so one
    # using up the rate leaves the other's untouched (Ray's HAProxy passed none: one bucket).
    # (No cutout after: this machine's own address has used up its rate.)
    with serving_in_one_place(tmp_path, one_place, cutout_after=False, auth={"rate_limit": "2/minute"}) as (_, base):
        rgb, _ = product_photo(64, 48)

        def cutout(source: str) -> int:
            with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60) as client:
                return client.post(f"{base}/v1/remove-background", headers={"X-Forwarded-For": "203.0.113.9"},
                                   files={"image": ("p.jpg", jpeg_bytes(rgb), "image/jpeg")}).status_code

        assert [cutout("127.0.0.3") for _ in range(3)] == [200, 200, 429]  # (the health polls came from .1)
        assert cutout("127.0.0.2") == 200  # its own bucket; the forged header counted for nobody


def test_free_ports_are_never_handed_out_twice_nor_from_the_kernels_own_range():
    # Tests start servers (two Ray nodes: ~28 ports) on ports chosen before they bind them.
    ports = [_free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(ports) < ephemeral_low
