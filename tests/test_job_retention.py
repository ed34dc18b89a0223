"""Finished jobs expire after the configured retention, and their files go with them."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from serve_app.jobs import JobStatus, JobStore
from serve_app.layer_jobs import LayerJobRunner, input_key, layer_key
from serve_app.storage import LocalStorage


def finished_job(store: JobStore, storage: LocalStorage) -> str:
    job = store.create("layers", {"model": "classic"})
    storage.put(input_key(job.id), b"input")
    storage.put(layer_key(job.id, 1), b"layer")
    store.claim(job.id, "owner", lease_s=30)
    store.finish(job.id, "owner", JobStatus.SUCCEEDED, result={})
    return job.id


def test_finished_jobs_older_than_the_retention_are_deleted_with_their_files(tmp_path):
    now = [datetime(2026, 11, 1, tzinfo=timezone.utc)]
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", clock=lambda: now[0])
    storage = LocalStorage(tmp_path / "data")
    runner = LayerJobRunner(store, storage, {}, max_running=1, lease_s=30, max_attempts=1,
                            retention_s=3600)
    old = finished_job(store, storage)
    now[0] += timedelta(hours=2)
    young = finished_job(store, storage)
    running = store.create("layers", {"model": "classic"}).id
    store.claim(running, "someone", lease_s=30)

    asyncio.run(runner.expire_finished())

    assert store.get(old) is None
    assert not storage.exists(input_key(old)) and not storage.exists(layer_key(old, 1))
    assert store.get(young) is not None and storage.exists(layer_key(young, 1))
    assert store.get(running).status == JobStatus.RUNNING
