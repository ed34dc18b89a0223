"""No accepted job is lost when the whole app dies and is deployed again."""

from __future__ import annotations

import time
from urllib.parse import urlparse

import pytest
from ray import serve

from tests import conftest
from tests.test_faults import APP, kill_replica
from tests.test_layer_jobs_api import QWEN, submit, wait_for_end
from tests.test_remove_background_api import red_disc_png

# Deploys configs of its own: runs after the modules that share the default app (conftest).
pytestmark = pytest.mark.own_deployment


def kill_and_restart_app(base_url: str, config: dict) -> None:
    """Kill every replica of the app (a crash: nothing drains), stop Serve and deploy
    the same config again.

    Killed rather than stopped: a graceful stop keeps the ingress draining for up to
    its graceful_shutdown_timeout_s, long enough for a short job to finish first.
    """
    for deployment in serve.status().applications[APP].deployments:
        kill_replica(deployment)
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": urlparse(base_url).port})
    conftest._deployed.clear()
    conftest.deploy_config(config)


def test_a_job_running_when_the_app_dies_finishes_after_a_restart(client, strata, tiny_models_dir, data_dir):
    rgb = red_disc_png(64, 48)[0]
    finished = submit(client, rgb, headers={"Prefer": "wait=60"}, model="classic", layers=2).json()
    assert finished["status"] == "succeeded"
    running = submit(client, rgb, **{**QWEN, "steps": 8}).json()
    deadline = time.monotonic() + 60
    while (client.get(f"/v1/jobs/{running['id']}").json()["step"] or 0) < 1:
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.1)

    kill_and_restart_app(strata, conftest.tiny_config(tiny_models_dir, data_dir))

    job = wait_for_end(client, running["id"], timeout_s=240)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] >= 2  # dispatched again once its lease lapsed
    zip_response = client.get(f"/v1/jobs/{finished['id']}/result.zip")
    assert zip_response.status_code == 200 and zip_response.content[:2] == b"PK"
