"""A job's event stream (what `GET /v1/jobs/{id}/events` sends): each step once, in
order, then the end.

A watcher follows a job running on this replica through the runner's events (each
sent right after the runner writes the step to the job store) and a job running on
another replica through its own poll of the store. These tests drive the runner's
side by hand on a real SQLite store; the store counts its reads so that a test can
wait for the watcher's poll instead of sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timezone

from serve_app.jobs import Job, JobStatus, JobStore
from serve_app.layer_jobs import LayerJobRunner
from serve_app.storage import LocalStorage

OWNER = "replica-a"


class ObservedStore(JobStore):
    """The SQLite job store, counting the watcher's reads of a job."""

    def __init__(self, url: str):
        super().__init__(url)
        self._reads = 0
        self._read = threading.Condition()

    def get(self, job_id: str) -> Job | None:
        job = super().get(job_id)
        with self._read:
            self._reads += 1
            self._read.notify_all()
        return job

    async def polled(self) -> None:
        """Return once the watcher has read the job in full after this call: two reads
        end (one may have begun before)."""
        def wait() -> None:
            with self._read:
                target = self._reads + 2
                assert self._read.wait_for(lambda: self._reads >= target, timeout=30), "the watcher never polled"
        await asyncio.to_thread(wait)


def runner_and_running_job(tmp_path) -> tuple[LayerJobRunner, ObservedStore, str]:
    store = ObservedStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    runner = LayerJobRunner(store, LocalStorage(tmp_path / "data"), {}, max_running=1, lease_s=30,
                            max_attempts=1, retention_s=3600)
    job_id = store.create("layers", {"model": "classic"}).id
    store.claim(job_id, OWNER, lease_s=30)
    return runner, store, job_id


def record_step(store: JobStore, job_id: str, step: int) -> None:
    """The runner's first move for each step: the job store (seen by every replica)."""
    store.renew(job_id, OWNER, 30, progress=step / 3, step=step, total_steps=3)


def announce_step(runner: LayerJobRunner, job_id: str, step: int) -> None:
    """The runner's second move for each step: this replica's listeners, with the step's time."""
    runner._publish(job_id, "progress", {"id": job_id, "status": "running", "progress": step / 3,
                                         "step": step, "total_steps": 3,
                                         "at": datetime.now(timezone.utc).isoformat()})


async def collect(events) -> list[tuple[str, dict]]:
    return [event async for event in events]


def progress_of(events: list[tuple[str, dict]]) -> list[dict]:
    return [data for event, data in events if event == "progress"]


def test_a_job_running_here_reports_each_step_once_with_its_time_though_the_poll_saw_it_first(tmp_path):
    runner, store, job_id = runner_and_running_job(tmp_path)

    async def watch() -> list[tuple[str, dict]]:
        runner._running[job_id] = asyncio.get_running_loop().create_future()  # what dispatch records
        events = runner.watch(job_id, poll_s=0.01)
        seen = [await anext(events)]  # the job as it is
        rest = asyncio.ensure_future(collect(events))
        for step in (1, 2, 3):
            record_step(store, job_id, step)
            await store.polled()  # the poll finds the step in the store before the runner says it
            announce_step(runner, job_id, step)
        store.finish(job_id, OWNER, JobStatus.SUCCEEDED, result={})
        return seen + await rest

    events = asyncio.run(watch())

    assert [data["step"] for data in progress_of(events)] == [1, 2, 3]
    assert all(data["at"] for data in progress_of(events))
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded"


def test_a_job_running_elsewhere_is_followed_through_the_store(tmp_path):
    runner, store, job_id = runner_and_running_job(tmp_path)

    async def watch() -> list[tuple[str, dict]]:
        events = runner.watch(job_id, poll_s=0.01)
        seen = [await anext(events)]
        for step in (1, 2, 3):
            record_step(store, job_id, step)
            seen.append(await anext(events))  # the poll's report of it
        store.finish(job_id, OWNER, JobStatus.SUCCEEDED, result={})
        return seen + await collect(events)

    events = asyncio.run(watch())

    assert [data["step"] for data in progress_of(events)] == [1, 2, 3]
    assert events[-1][1]["status"] == "succeeded"


def test_a_job_run_again_from_its_first_step_reports_its_steps_again(tmp_path):
    runner, store, job_id = runner_and_running_job(tmp_path)

    async def watch() -> list[tuple[str, dict]]:
        events = runner.watch(job_id, poll_s=0.01)
        seen = [await anext(events)]
        for step in (1, 2, 1, 2, 3):  # its model replica was lost after step 2: the next attempt starts over
            record_step(store, job_id, step)
            seen.append(await anext(events))
        store.finish(job_id, OWNER, JobStatus.SUCCEEDED, result={})
        return seen + await collect(events)

    assert [data["step"] for data in progress_of(asyncio.run(watch()))] == [1, 2, 1, 2, 3]
