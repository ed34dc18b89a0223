"""Shared fixtures: one real local Ray cluster per test session, apps deployed
from the same YAML configs users run, and real HTTP against them."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from serve_app.run import SERVING_ENV, free_port, spare_serve_ports

# Ray 2.60 enables token auth for new local clusters; tests run without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The session's Ray takes the environment `make run` and the image give users, with
# its fixed ports moved to free ones: a test may start another Ray beside it.
for name, value in {**SERVING_ENV, **spare_serve_ports()}.items():
    os.environ.setdefault(name, value)

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


_free_port = free_port  # the name the tests import


def load_script(name: str):
    """A module of scripts/ (they are not a package), loaded from its file once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (and pickle) look a module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The job store and results of this session's app."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """Tiny models written offline by scripts/make_tiny_models.py."""
    out = tmp_path_factory.mktemp("tiny-models")
    load_script("make_tiny_models").main(["--out", str(out)])
    return out


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory):
    """HF_HOME and the remote-code module cache in tmp; offline."""
    import transformers.dynamic_module_utils as dynamic_modules

    home = tmp_path_factory.mktemp("hf_home")
    modules = home / "modules"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_MODULES_CACHE", str(modules))
        # transformers reads HF_MODULES_CACHE at import; point its copy at tmp too, and
        # undo the sys.path entry it adds for the module cache.
        mp.setattr(dynamic_modules, "HF_MODULES_CACHE", str(modules))
        mp.setattr(sys, "path", list(sys.path))
        # A `transformers_modules` package imported from another cache earlier in the
        # session would hide this one's modules from the remote code's relative imports.
        for name in [name for name in sys.modules if name.split(".")[0] == "transformers_modules"]:
            mp.delitem(sys.modules, name)
        yield home


@pytest.fixture(scope="session")
def serve_instance():
    """A real local Ray cluster with Serve's HTTP proxy on a free loopback port."""
    import ray
    from ray import serve

    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False,
             _metrics_export_port=_free_port(),
             # Workers report metrics every second, not every 10 s: metrics tests wait less.
             _system_config={"metrics_report_interval_ms": 1000})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(serve_instance) -> str:
    """The Prometheus endpoint of the session's Ray node (Ray's and Strata's metrics)."""
    import ray

    node = ray.nodes()[0]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def load_config(name: str) -> dict:
    """A config file of configs/, as a dict."""
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def wait_until(condition: Callable[[], object], timeout_s: float, what: str):
    """Poll `condition` until it returns something truthy, and return that; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked `own_deployment` deploy configs of their own: they run after the
    others, which share the default app (one deploy, not one after each of those)."""
    items.sort(key=lambda item: item.get_closest_marker("own_deployment") is not None)


_deployed: list[dict] = []


def deploy_config(config: dict) -> None:
    """Deploy a Serve config dict as `serve run`/`serve deploy` do; it replaces
    whatever applications were deployed before. Redeploying the current one is a no-op.
    Returns when every application runs; raises as soon as one fails to deploy."""
    # Private client API: the calls `serve run CONFIG` makes in-process. (Its blocking
    # deploy waits for RUNNING only, so a failed deploy would take its whole 60 s.)
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    if _deployed and _deployed[-1] == config:
        return
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    _deployed.append(copy.deepcopy(config))
    for app in config["applications"]:
        client._wait_for_application_running(app["name"], timeout_s=120)


def tiny_config(tiny_models_dir: Path, data_dir: Path) -> dict:
    """configs/test.yaml pointed at this session's tiny models and data directory."""
    config = copy.deepcopy(load_config("test.yaml"))
    args = config["applications"][0]["args"]
    args["segmentation"]["tiny"]["weights"] = str(tiny_models_dir / "birefnet")
    args["layered"]["tiny-qwen"]["weights"] = str(tiny_models_dir / "qwen-image-layered")
    args["jobs"]["data_dir"] = str(data_dir)
    return config


@pytest.fixture
def strata(serve_instance, tiny_models_dir, data_dir) -> str:
    """Base URL of Strata deployed from configs/test.yaml on the session's Ray."""
    deploy_config(tiny_config(tiny_models_dir, data_dir))
    return serve_instance


@pytest.fixture
def client(strata):
    with httpx.Client(base_url=strata, timeout=60) as http:
        yield http
