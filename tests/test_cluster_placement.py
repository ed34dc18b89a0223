"""On a Ray cluster, model replicas run on GPU nodes and the ingress on CPU nodes.

A real two-node Ray cluster on this one machine, separate from the session's Ray:
a head node offering the custom resource `strata_cpu_node`, and a second node that
advertises one GPU and `gpu_node` (a fake GPU node: Ray only schedules by the
numbers; torch still runs on the CPU). A cluster-like config with the tiny models
is deployed with the `serve deploy` CLI; placement is read with `ray list`. This
process never connects a driver to that cluster (the session's Ray may be connected
in it): everything goes through subprocesses and HTTP.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serve_app.run import spare_serve_ports
from tests.conftest import ROOT, _free_port, tiny_config
from tests.test_remove_background_api import post_image, red_disc_png

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.5)


class LocalCluster:
    """Ray nodes started with `ray start --block`, each in its own process group
    and temp directory, so they are stopped by those ids and nothing else is."""

    def __init__(self) -> None:
        # Short: Ray's socket paths under the temp dir must stay under 108 bytes.
        self.temp_root = Path(tempfile.mkdtemp(prefix="strata-2n-", dir="/tmp"))
        self.env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        self.env.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                        # A stopped node goes at once instead of draining its replicas for 30 s.
                        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        self.gcs_address = f"{HOST}:{_free_port()}"
        self.dashboard_url = f"http://{HOST}:{_free_port()}"
        self.nodes: dict[str, subprocess.Popen] = {}  # by name, in start order

    def start_node(self, name: str, *args: str) -> None:
        log = open(self.temp_root / f"{name}.log", "wb")
        ports = ["--node-ip-address", HOST, "--node-manager-port", str(_free_port()),
                 "--object-manager-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
                 "--dashboard-agent-listen-port", str(_free_port()),
                 "--dashboard-agent-grpc-port", str(_free_port()),
                 "--runtime-env-agent-port", str(_free_port())]
        self.nodes[name] = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--temp-dir",
             str(self.temp_root / name), "--object-store-memory", str(100 * 1024**2), *ports, *args],
            env={**self.env, **spare_serve_ports()}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start(self) -> None:
        dashboard_port = self.dashboard_url.rsplit(":", 1)[1]
        self.start_node("head", "--head", "--port", self.gcs_address.rsplit(":", 1)[1],
                        "--num-cpus", "2", "--resources", json.dumps({"strata_cpu_node": 100}),
                        "--include-dashboard", "true", "--dashboard-host", HOST,
                        "--dashboard-port", dashboard_port, "--ray-client-server-port", str(_free_port()))
        self.wait_for_nodes(lambda: httpx.get(f"{self.dashboard_url}/api/version", timeout=5).is_success, 120,
                            "the head node's dashboard answers")
        self.start_node("gpu", "--address", self.gcs_address, "--num-cpus", "2", "--num-gpus", "1",
                        "--resources", json.dumps({"gpu_node": 1}))
        self.wait_for_nodes(lambda: len([n for n in self.ray_list("nodes") if n["state"] == "ALIVE"]) == 2, 180,
                            "both nodes are alive")

    def wait_for_nodes(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """`wait_until`, failing at once if a node's `ray start` exits, and with the end of
        every node's log if the wait times out: a node that never came up says why."""
        def met_while_running() -> bool:
            for name, node in self.nodes.items():
                if node.poll() is not None:
                    pytest.fail(f"the {name} node's `ray start` exited with {node.returncode}:\n{self.log_tail(name)}")
            return condition()

        try:
            wait_until(met_while_running, timeout_s, what)
        except AssertionError as exc:
            logs = "\n".join(f"--- {name}.log\n{self.log_tail(name)}" for name in self.nodes)
            raise AssertionError(f"{exc}\n{logs}") from None

    def log_tail(self, name: str) -> str:
        return (self.temp_root / f"{name}.log").read_text(errors="replace")[-3000:]

    def ray_list(self, kind: str) -> list[dict]:
        """`ray list <kind> --detail` of this cluster, as JSON."""
        result = self.cli("ray", "list", kind, "--detail", "--format", "json", "--limit", "1000",
                          "--address", self.dashboard_url)
        # An empty list prints "No resource in the cluster" instead of JSON.
        return json.loads(result.stdout) if result.stdout.lstrip().startswith("[") else []

    def serve_deploy(self, config: dict) -> None:
        path = self.temp_root / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        self.cli("serve", "deploy", str(path), "--address", self.dashboard_url)

    def cli(self, *command: str) -> subprocess.CompletedProcess:
        """Run a command of Ray's CLI (`ray`, `serve`) against this cluster."""
        result = subprocess.run([str(BIN / command[0]), *command[1:]], env=self.env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
        return result

    def application(self) -> dict:
        """The `strata` application's details from Serve's REST API ({} before it exists)."""
        details = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=10).json()
        return (details.get("applications") or {}).get("strata", {})

    def stop(self) -> None:
        """Stop the nodes, the GPU node first: SIGTERM makes `ray start --block` stop
        its node's processes (in seconds); past 30 s its whole group is killed."""
        for node in reversed(self.nodes.values()):
            node.terminate()
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)  # not reaped yet: the group id is still ours
                node.wait()
        # Anything of these nodes that left its group (it names our temp dir).
        for process in psutil.process_iter(["pid", "cmdline"]):
            if any(str(self.temp_root) in part for part in process.info["cmdline"] or ()):
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
        shutil.rmtree(self.temp_root, ignore_errors=True)


def cluster_config(tiny_models_dir: Path, data_dir: Path, http_port: int) -> dict:
    """configs/test.yaml as a cluster would place it: models on GPU nodes, the ingress on CPU nodes."""
    config = copy.deepcopy(tiny_config(tiny_models_dir, data_dir))
    config["http_options"] = {"host": HOST, "port": http_port}
    app = config["applications"][0]
    args = app["args"]
    del args["layered"]["tiny-qwen"]  # keeps the test light; classic covers the layer deployment
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "layers-tiny-qwen"]
    args["ingress_resources"] = {"strata_cpu_node": 1}
    args["segmentation"]["tiny"].update(num_gpus=0.25, resources={"gpu_node": 0.1})
    args["segmentation"]["classic"]["resources"] = {"gpu_node": 0.1}
    args["layered"]["classic"]["num_gpus"] = 0.25
    return config


@pytest.fixture(scope="module")
def cluster(tiny_models_dir, tmp_path_factory):
    """The two-node cluster with the cluster-like config deployed and RUNNING."""
    cluster = LocalCluster()
    http_port = _free_port()
    try:
        cluster.start()
        config = cluster_config(tiny_models_dir, tmp_path_factory.mktemp("cluster-data"), http_port)
        cluster.serve_deploy(config)
        wait_until(lambda: cluster.application().get("status") in ("RUNNING", "DEPLOY_FAILED"), 240,
                   "the application is deployed")
        application = cluster.application()
        assert application["status"] == "RUNNING", application
        cluster.http_url = f"http://{HOST}:{http_port}"
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def placement(cluster) -> dict[str, set[str]]:
    """For each live Serve replica's deployment, the kinds of node it runs on ("head", "gpu")."""
    kinds = {}
    for node in cluster.ray_list("nodes"):
        resources = node["resources_total"]
        kinds[node["node_id"]] = "gpu" if "gpu_node" in resources else "head" if node["is_head_node"] else "?"
    where: dict[str, set[str]] = {}
    for actor in cluster.ray_list("actors"):
        # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<id>.
        if actor["state"] == "ALIVE" and (actor["name"] or "").startswith("SERVE_REPLICA::strata#"):
            deployment = actor["name"].split("#")[1]
            where.setdefault(deployment, set()).add(kinds[actor["node_id"]])
    return where


def test_every_model_replica_runs_on_the_gpu_node(placement):
    assert {name: kinds for name, kinds in placement.items() if name != "Ingress"} == {
        "tiny": {"gpu"}, "classic": {"gpu"}, "layers-classic": {"gpu"},
    }


def test_the_ingress_runs_on_the_head_node(placement):
    assert placement["Ingress"] == {"head"}


def test_a_request_to_the_head_is_answered_by_a_model_on_the_gpu_node(cluster):
    data, _ = red_disc_png()
    with httpx.Client(base_url=cluster.http_url, timeout=60) as client:
        response = post_image(client, data, model="tiny")
        health = client.get("/v1/health").json()
    assert response.status_code == 200
    assert response.headers["x-engine"] == "birefnet"  # the real loading code, on the "GPU" node's CPU
    assert health["models"]["tiny"]["device"] == "cpu"
