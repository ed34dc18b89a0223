"""Faults on a real local Ray: a model replica killed under load or mid-job, the
whole app deleted and redeployed with jobs queued. Callers get an answer, killed
replicas come back, and no accepted job is lost.

Replicas are killed with `ray.kill` on the replica actor, found by its Serve name
(`SERVE_REPLICA::<app>#<deployment>#<id>`) among the cluster's named actors.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import ray
from ray import serve

from tests import conftest
from tests.conftest import deploy_config, tiny_config, wait_until
from tests.test_layer_jobs_api import QWEN, submit, wait_for_end
from tests.test_remove_background_api import post_image, red_disc_png
from tests.test_serving import with_deployment

# Deploys configs of its own: runs after the modules that share the default app (conftest).
pytestmark = pytest.mark.own_deployment

APP = "strata"
# A caller that gets no answer within this has hung: the test fails. It is above
# configs/test.yaml's model_timeout_s (60 s), the server's own bound on a model call.
CALLER_TIMEOUT_S = 90
RECOVERY_TIMEOUT_S = 120


def replica_ids(deployment: str) -> set[str]:
    """Unique ids of the deployment's live replica actors."""
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return {actor["name"][len(prefix):] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(prefix)}


def kill_replica(deployment: str) -> str:
    """Kill the deployment's only replica actor (as a crash would); returns its id."""
    (replica_id,) = replica_ids(deployment)
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#{deployment}#{replica_id}", namespace="serve")
    ray.kill(actor, no_restart=True)
    return replica_id


def running_again(deployment: str, killed: str) -> bool:
    """The deployment is healthy again on one running replica that is not the killed one."""
    status = serve.status().applications[APP].deployments[deployment]
    live = replica_ids(deployment)
    return (status.status == "HEALTHY" and dict(status.replica_states) == {"RUNNING": 1}
            and bool(live) and killed not in live)


@dataclass
class Call:
    started: float
    ended: float
    response: httpx.Response | None
    error: str | None = None


def call_in_a_loop(base_url: str, data: bytes, calls: list[Call], pending: dict[int, float],
                   stop: threading.Event) -> None:
    """One caller: post the image again and again until told to stop."""
    me = threading.get_ident()
    with httpx.Client(base_url=base_url, timeout=CALLER_TIMEOUT_S) as http:
        while not stop.is_set():
            started = pending[me] = time.monotonic()
            try:
                response, error = post_image(http, data, model="tiny"), None
            except httpx.HTTPError as exc:  # a timeout is a hang: recorded, then failed on
                response, error = None, f"{type(exc).__name__}: {exc}"
            del pending[me]
            calls.append(Call(started, time.monotonic(), response, error))


def waiting_in_the_batch(pending: dict[int, float], count: int) -> bool:
    """`count` calls have waited long enough (0.3 s, against ~10 ms of ingress work on
    these small images) that they sit in the replica, waiting for their batch."""
    now = time.monotonic()
    return sum(now - started > 0.3 for started in list(pending.values())) >= count


def test_killing_a_segmentation_replica_under_load_answers_every_caller_and_it_comes_back(
        strata, client, tiny_models_dir, data_dir):
    # Batches wait up to 1 s to fill, so at any moment several requests sit in the replica.
    deploy_config(with_deployment(tiny_config(tiny_models_dir, data_dir), "tiny",
                                  user_config={"max_batch_size": 16, "batch_wait_timeout_s": 1.0}))
    data, _ = red_disc_png()
    calls: list[Call] = []
    pending: dict[int, float] = {}
    stop = threading.Event()
    with ThreadPoolExecutor(6) as pool:
        callers = [pool.submit(call_in_a_loop, strata, data, calls, pending, stop) for _ in range(6)]
        try:
            wait_until(lambda: sum(c.response is not None and c.response.status_code == 200 for c in calls) >= 6,
                       60, "six answers before the kill")
            wait_until(lambda: waiting_in_the_batch(pending, 4), 60, "four calls waiting in the replica")
            killed_at = time.monotonic()
            killed = kill_replica("tiny")
            wait_until(lambda: running_again("tiny", killed), RECOVERY_TIMEOUT_S, "a new tiny replica")
            recovered_at = time.monotonic()
            wait_until(lambda: sum(c.started > recovered_at and c.response is not None
                                   and c.response.status_code == 200 for c in calls) >= 6,
                       RECOVERY_TIMEOUT_S, "six answers from the new replica")
        finally:
            stop.set()
        for caller in callers:
            caller.result()

    assert [c.error for c in calls if c.error] == []  # nobody hung past the bound or lost the connection
    in_flight = [c for c in calls if c.started < killed_at < c.ended]
    assert in_flight, "no request was in flight when the replica was killed"
    for call in calls:
        assert call.response.status_code in (200, 503), call.response.text
        if call.response.status_code == 503:
            assert call.response.headers["content-type"] == "application/problem+json"
            assert call.response.headers["retry-after"] == "1"
            assert call.response.json()["detail"]
    health = client.get("/v1/health").json()["models"]["tiny"]
    assert health["loaded"] and health["replicas"] == {"RUNNING": 1} and health["replica"] != killed
    statuses = Counter(c.response.status_code for c in calls)
    print(f"FIGURES segmentation kill: {len(calls)} calls from 6 callers, {len(in_flight)} in flight at the kill, "
          f"statuses {dict(statuses)}, 0 hung, replica back {recovered_at - killed_at:.1f} s after the kill")


def deploy_with_jobs(tiny_models_dir, data_dir, **jobs) -> dict:
    """Deploys the tiny app with these `jobs` settings changed; returns its config."""
    config = copy.deepcopy(tiny_config(tiny_models_dir, data_dir))
    config["applications"][0]["args"]["jobs"].update(jobs)
    deploy_config(config)
    return config


def submit_running_qwen_job(client, rgb) -> dict:
    """A 12-step tiny Qwen job, once its first step is done."""
    job = submit(client, rgb, **{**QWEN, "steps": 12}).json()
    wait_until(lambda: (client.get(f"/v1/jobs/{job['id']}").json()["step"] or 0) >= 1, 120,
               "the job's first step")
    return job


def test_a_job_whose_layered_replica_is_killed_mid_run_is_dispatched_again_at_once_and_succeeds(
        strata, client, tiny_models_dir, data_dir):
    # A lease far longer than the wait below: the job must not sit out its lease.
    deploy_with_jobs(tiny_models_dir, data_dir, lease_s=900)
    rgb = red_disc_png(64, 48)[0]
    job = submit_running_qwen_job(client, rgb)

    killed_at = time.monotonic()
    killed = kill_replica("layers-tiny-qwen")

    ended = wait_for_end(client, job["id"], timeout_s=240)
    print(f"FIGURES layered kill: job {ended['status']} after {ended['attempts']} attempts, "
          f"{time.monotonic() - killed_at:.1f} s after the kill")
    assert ended["status"] == "succeeded", ended["error"]
    assert ended["attempts"] >= 2  # the first dispatch died with its replica
    assert [layer["index"] for layer in ended["result"]["layers"]] == [1, 2]
    layer = client.get(f"/v1/jobs/{job['id']}/layers/1.png")
    assert layer.status_code == 200 and layer.content[:8] == b"\x89PNG\r\n\x1a\n"
    wait_until(lambda: running_again("layers-tiny-qwen", killed), RECOVERY_TIMEOUT_S, "a new layered replica")


def test_jobs_queued_when_the_app_is_deleted_all_succeed_after_it_is_redeployed(
        strata, client, tiny_models_dir, data_dir):
    config = deploy_with_jobs(tiny_models_dir, data_dir, max_running=1)
    rgb = red_disc_png(64, 48)[0]
    running = submit_running_qwen_job(client, rgb)
    queued = [submit(client, rgb, model="classic", layers=2).json() for _ in range(3)]
    # One runs at a time (max_running: 1) and the first has many steps to go, so these wait.
    assert [client.get(f"/v1/jobs/{job['id']}").json()["status"] for job in queued] == ["queued"] * 3
    accepted = [running["id"], *(job["id"] for job in queued)]

    serve.delete(APP)
    conftest._deployed.clear()
    deploy_config(config)

    ended = [wait_for_end(client, job_id, timeout_s=240) for job_id in accepted]
    print(f"FIGURES app restart: {len(accepted)} jobs accepted (1 running, 3 queued), statuses after "
          f"{dict(Counter(job['status'] for job in ended))}, attempts {[job['attempts'] for job in ended]}")
    assert [job["status"] for job in ended] == ["succeeded"] * 4, [job["error"] for job in ended]
    for job in ended:
        archive = client.get(f"/v1/jobs/{job['id']}/result.zip")
        assert archive.status_code == 200 and archive.content[:2] == b"PK"
