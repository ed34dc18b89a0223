"""A segmentation deployment scales out under load and back in when it stops.

Autoscaling delays are set to seconds (production configs wait minutes) so that
the test sees both decisions; the load is real concurrent HTTP traffic.
"""

from __future__ import annotations

import copy
import threading

import httpx
import pytest
from ray import serve

from tests.conftest import deploy_config, tiny_config, wait_until
from tests.test_remove_background_api import post_image, red_disc_png

# Deploys configs of its own: runs after the modules that share the default app (conftest).
pytestmark = pytest.mark.own_deployment

MODEL = "classic"


def autoscaled_config(tiny_models_dir, data_dir) -> dict:
    config = copy.deepcopy(tiny_config(tiny_models_dir, data_dir))
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == MODEL:
            deployment.pop("num_replicas")
            deployment["autoscaling_config"] = {
                "min_replicas": 1,
                "max_replicas": 3,
                "target_ongoing_requests": 1,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 2,
                "upscale_delay_s": 1,
                "downscale_delay_s": 3,
            }
    return config


def running_replicas() -> int:
    status = serve.status().applications["strata"].deployments[MODEL]
    return status.replica_states.get("RUNNING", 0)


@pytest.fixture
def load(serve_instance):
    """Starts concurrent POSTs at the classic model; stops them when told to or at teardown."""
    stop = threading.Event()
    statuses: list[int] = []
    data, _ = red_disc_png()

    def client_loop() -> None:
        with httpx.Client(base_url=serve_instance, timeout=60) as client:
            while not stop.is_set():
                statuses.append(post_image(client, data, model=MODEL).status_code)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(6)]

    def start() -> None:
        for thread in threads:
            thread.start()

    def finish() -> list[int]:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
        return statuses

    yield start, finish
    finish()


def test_segmentation_replicas_rise_under_load_and_fall_back_when_it_stops(serve_instance, tiny_models_dir,
                                                                        data_dir, load):
    deploy_config(autoscaled_config(tiny_models_dir, data_dir))
    wait_until(lambda: running_replicas() == 1, 60, "the deployment runs its one minimum replica")
    start, finish = load

    start()
    wait_until(lambda: running_replicas() > 1, 120, "more than one replica runs under load")
    statuses = finish()

    assert statuses and set(statuses) == {200}
    wait_until(lambda: running_replicas() == 1, 120, "the deployment is back to one replica")
