"""A job's event stream (what `GET /v1/jobs/{id}/events` sends): each step once, then the end.

The runner's events reach a watcher two ways: from the runner on this replica,
right after it writes the step to the job store, and from the watcher's own poll
of the store (how jobs running on another replica are followed). These tests
drive that interleaving by hand on a real SQLite store.
"""

from __future__ import annotations

import asyncio

from serve_app.jobs import JobStatus, JobStore
from serve_app.layer_jobs import LayerJobRunner
from serve_app.storage import LocalStorage

OWNER = "replica-a"


def runner_and_running_job(tmp_path) -> tuple[LayerJobRunner, JobStore, str]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    runner = LayerJobRunner(store, LocalStorage(tmp_path / "data"), {}, max_running=1, lease_s=30,
                            max_attempts=1, retention_s=3600)
    job_id = store.create("layers", {"model": "classic"}).id
    store.claim(job_id, OWNER, lease_s=30)
    return runner, store, job_id


def announce_step(runner: LayerJobRunner, job_id: str, step: int) -> None:
    """The runner telling this replica's listeners about a step."""
    runner._publish(job_id, "progress", {"id": job_id, "status": "running", "progress": step / 3,
                                         "step": step, "total_steps": 3, "at": None})


def record_step(runner: LayerJobRunner, store: JobStore, job_id: str, step: int, *, then_publish: bool = True):
    """What the runner does for each step: the job store first, then this replica's listeners."""
    store.renew(job_id, OWNER, 30, progress=step / 3, step=step, total_steps=3)
    if then_publish:
        announce_step(runner, job_id, step)


def steps_of(events: list[tuple[str, dict]]) -> list[int]:
    return [data["step"] for event, data in events if event == "progress"]


def test_a_step_the_poll_saw_first_is_not_sent_again_when_the_runner_announces_it(tmp_path):
    runner, store, job_id = runner_and_running_job(tmp_path)

    async def watch() -> list[tuple[str, dict]]:
        events = runner.watch(job_id, poll_s=0.01)
        seen = [await anext(events)]  # the job as it is
        record_step(runner, store, job_id, 1, then_publish=False)
        seen.append(await anext(events))  # the poll finds step 1 in the store...
        announce_step(runner, job_id, 1)  # ...then the runner says it
        record_step(runner, store, job_id, 2)
        record_step(runner, store, job_id, 3)
        store.finish(job_id, OWNER, JobStatus.SUCCEEDED, result={})
        return seen + [event async for event in events]

    events = asyncio.run(watch())

    assert steps_of(events) == [1, 2, 3]
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded"


def test_a_job_run_again_from_its_first_step_reports_its_steps_again(tmp_path):
    runner, store, job_id = runner_and_running_job(tmp_path)

    async def watch() -> list[tuple[str, dict]]:
        events = runner.watch(job_id, poll_s=0.01)
        seen = [await anext(events)]
        for step in (1, 2):
            record_step(runner, store, job_id, step)
        for step in (1, 2, 3):  # its model replica was lost: the next attempt starts over
            record_step(runner, store, job_id, step)
        store.finish(job_id, OWNER, JobStatus.SUCCEEDED, result={})
        return seen + [event async for event in events]

    assert steps_of(asyncio.run(watch())) == [1, 2, 1, 2, 3]
