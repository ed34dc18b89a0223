"""Serve behaviour on a real local Ray: run-time batching changes, queue bounds,
fallback to the classic engine, startup errors, the health report and the memory
of a model replica on CPU."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from ray import serve

from tests.conftest import deploy_config, tiny_config, wait_until
from tests.test_remove_background_api import assert_problem, post_image, red_disc_png

# Deploys configs of its own: runs after the modules that share the default app (conftest).
pytestmark = pytest.mark.own_deployment


def with_deployment(config: dict, name: str, **options) -> dict:
    config = copy.deepcopy(config)
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == name:
            deployment.update(options)
    return config


def concurrent_posts(client, count: int, **params) -> list[httpx.Response]:
    data, _ = red_disc_png()
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: post_image(client, data, **params), range(count)))


def test_max_batch_size_changes_at_run_time_without_a_restart(client, tiny_models_dir, data_dir):
    before = client.get("/v1/health").json()["models"]["tiny"]
    config = with_deployment(tiny_config(tiny_models_dir, data_dir), "tiny",
                             user_config={"max_batch_size": 1, "batch_wait_timeout_s": 0.2})
    deploy_config(config)
    responses = concurrent_posts(client, 6, model="tiny")
    assert {r.headers["x-batch-size"] for r in responses} == {"1"}
    after = client.get("/v1/health").json()["models"]["tiny"]
    assert after["max_batch_size"] == 1
    assert after["replica"] == before["replica"]  # reconfigured in place, not restarted


def test_a_request_finding_the_model_idle_does_not_wait_for_a_batch_to_fill(client, tiny_models_dir, data_dir):
    # A batch window longer than model_timeout_s (60 s in test.yaml): a lone request that
    # waited it out would be answered 503 "model timeout"; one run at once gets its mask.
    config = with_deployment(tiny_config(tiny_models_dir, data_dir), "tiny",
                             user_config={"max_batch_size": 8, "batch_wait_timeout_s": 120})
    deploy_config(config)
    data, _ = red_disc_png()
    response = post_image(client, data, model="tiny")
    assert response.status_code == 200
    assert response.headers["x-batch-size"] == "1"


def test_full_queue_answers_503_with_retry_after(client, tiny_models_dir, data_dir):
    config = with_deployment(tiny_config(tiny_models_dir, data_dir), "tiny", max_ongoing_requests=1,
                             max_queued_requests=1,
                             user_config={"max_batch_size": 1, "batch_wait_timeout_s": 1.0})
    deploy_config(config)
    responses = concurrent_posts(client, 8, model="tiny")
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1
    busy = next(r for r in responses if r.status_code == 503)
    assert_problem(busy, 503, "queue")
    assert busy.headers["retry-after"] == "1"


def test_unavailable_weights_fall_back_to_classic_and_say_so(client, tiny_models_dir, data_dir, tmp_path):
    config = tiny_config(tiny_models_dir, data_dir)
    config["applications"][0]["args"]["segmentation"]["tiny"].update(
        weights=str(tmp_path / "no-such-model"), fallback="classic")
    deploy_config(config)
    data, _ = red_disc_png()
    response = post_image(client, data, model="tiny")
    assert response.status_code == 200
    assert response.headers["x-engine"] == "classic"
    tiny = client.get("/v1/health").json()["models"]["tiny"]
    assert tiny["engine"] == "classic"
    assert "no-such-model" in tiny["fallback_reason"]


def test_unavailable_weights_without_fallback_fail_at_startup_with_the_reason(serve_instance, tiny_models_dir, data_dir, tmp_path):
    config = tiny_config(tiny_models_dir, data_dir)
    config["applications"][0]["args"]["segmentation"]["tiny"]["weights"] = str(tmp_path / "missing")
    with pytest.raises(Exception):
        deploy_config(config)
    status = serve.status().applications["strata"]
    assert status.status == "DEPLOY_FAILED"
    assert "missing" in status.deployments["tiny"].message


def replica_process(deployment: str) -> psutil.Process:
    """The deployment's one replica process, once any replica it replaced has exited."""
    def only_one() -> list[psutil.Process]:
        found = [p for p in psutil.process_iter(["cmdline"])
                 if (p.info["cmdline"] or [""])[0].strip() == f"ray::ServeReplica:strata:{deployment}"]
        return found if len(found) == 1 else []

    return wait_until(only_one, 60, f"one replica process of {deployment}")[0]


def minor_page_faults(process: psutil.Process) -> int:
    """Pages the kernel has handed the process fresh (minflt of /proc/PID/stat)."""
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


def test_a_model_replica_on_cpu_reuses_its_memory_from_call_to_call(client, tiny_models_dir, data_dir):
    # At 1024² the tiny BiRefNet's largest buffers are over 32 MiB: under glibc's usual
    # settings every call mapped them afresh (~550 page faults a call, ~10 ms of CPU).
    config = tiny_config(tiny_models_dir, data_dir)
    config["applications"][0]["args"]["segmentation"]["tiny"]["input_size"] = 1024
    deploy_config(config)
    replica = replica_process("tiny")
    data, _ = red_disc_png()
    for _ in range(3):  # its heap grows to what a call needs
        assert post_image(client, data, model="tiny").status_code == 200
    before = minor_page_faults(replica)
    for _ in range(10):
        assert post_image(client, data, model="tiny").status_code == 200
    assert (minor_page_faults(replica) - before) / 10 < 50


def test_health_reports_each_model_engine_device_and_replicas(client):
    body = client.get("/v1/health").json()
    assert body["status"] == "ok" and body["default_model"] == "tiny"
    tiny, classic = body["models"]["tiny"], body["models"]["classic"]
    assert (tiny["engine"], tiny["device"], tiny["dtype"]) == ("birefnet", "cpu", "float32")
    assert classic["engine"] == "classic" and classic["fallback_reason"] is None
    assert tiny["replicas"] == {"RUNNING": 1}


def test_health_says_what_each_weights_free_engine_is_for_and_how_to_serve_the_real_models(client):
    body = client.get("/v1/health").json()
    cutout, layers, tiny = body["models"]["classic"], body["layer_models"]["classic"], body["models"]["tiny"]
    assert "plain or gradient backdrops" in cutout["engine_about"] and "not for photos" in cutout["engine_about"]
    assert "BiRefNet or RMBG-2.0" in cutout["real_models_setup"]
    assert "scripts/fetch_models.py" in cutout["real_models_setup"] and "HF_TOKEN" in cutout["real_models_setup"]
    assert "flat graphics" in layers["engine_about"] and "Qwen-Image-Layered" in layers["real_models_setup"]
    assert tiny["engine_about"] is None and tiny["real_models_setup"] is None  # a model with weights


def test_openapi_documents_the_routes(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/remove-background", "/v1/health", "/healthz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
