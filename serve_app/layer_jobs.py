"""Layer jobs: accepted as durable rows, dispatched to a model under a lease.

Each ingress replica runs one `LayerJobRunner`. Its dispatch loop claims queued
jobs (and jobs whose lease lapsed: their ingress or replica died) up to
`max_running` at a time, streams each one from the model deployment, records
progress, and stores the layers. Other ingress replicas see the same rows, so a
job survives the restart of any process. Progress is also published in-process
so a Server-Sent-Events client on this replica sees every step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from deployments.metrics import JobMetrics
from serve_app import exports, imaging
from serve_app.jobs import Job, JobStatus, JobStore, Renewal
from serve_app.storage import Storage
from serve_app.transport import for_payload

logger = logging.getLogger("ray.serve")
KIND = "layers"
# How often each runner refreshes the strata_jobs gauge from the store.
JOB_METRICS_EVERY_S = 5.0


def input_key(job_id: str) -> str:
    return f"jobs/{job_id}/input.png"


def layer_key(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/{exports.layer_filename(index)}"


def manifest_key(job_id: str) -> str:
    return f"jobs/{job_id}/manifest.json"


class LayerJobRunner:
    """Dispatches this replica's share of layer jobs and tells listeners about them."""

    def __init__(self, store: JobStore, storage: Storage, models: dict[str, DeploymentHandle], *,
                 max_running: int, lease_s: float, max_attempts: int, retention_s: float,
                 poll_s: float = 1.0):
        self.store = store
        self.storage = storage
        self._models = models
        self._max_running = max_running
        self._lease_s = lease_s
        self._max_attempts = max_attempts
        self._retention_s = retention_s
        self._poll_s = poll_s
        self._owner_prefix = uuid.uuid4().hex[:12]
        self._running: dict[str, asyncio.Task] = {}
        self._streams: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._listeners: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self._loop_task: asyncio.Task | None = None
        self._last_expiry = float("-inf")
        self._job_metrics = JobMetrics()
        self._last_job_metrics = float("-inf")

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatch loop on the running event loop."""
        self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_loop())

    def wake(self) -> None:
        """Look for work now (a job was just accepted)."""
        self._wake.set()

    async def _dispatch_loop(self) -> None:
        while True:
            try:
                await self._dispatch_once()
                if time.monotonic() - self._last_expiry >= 60:
                    self._last_expiry = time.monotonic()
                    await self.expire_finished()
                if time.monotonic() - self._last_job_metrics >= JOB_METRICS_EVERY_S:
                    self._last_job_metrics = time.monotonic()
                    await self.report_job_counts()
            except Exception:  # the loop must outlive a database hiccup
                logger.exception("layer job dispatch failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _dispatch_once(self) -> None:
        free = self._max_running - len(self._running)
        if free <= 0:
            return
        candidates = await run_in_threadpool(self.store.dispatchable, None, free + len(self._running), kind=KIND)
        for job in candidates:
            if len(self._running) >= self._max_running:
                break
            if job.id in self._running:
                continue
            owner = f"{self._owner_prefix}:{uuid.uuid4().hex[:12]}"
            claimed = await run_in_threadpool(
                lambda: self.store.claim(job.id, owner, self._lease_s, max_attempts=self._max_attempts))
            if claimed is None:
                await self._publish_status(job.id)  # it may have ended as cancelled/failed
                continue
            task = asyncio.get_running_loop().create_task(self._run(claimed, owner))
            self._running[job.id] = task
            task.add_done_callback(lambda _t, job_id=job.id: self._job_done(job_id))

    def _job_done(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._streams.pop(job_id, None)
        self._wake.set()

    async def expire_finished(self) -> None:
        """Delete finished jobs older than the retention, with their files."""
        for job_id in await run_in_threadpool(self.store.expired, self._retention_s):
            await run_in_threadpool(self.delete_files_and_row, job_id)

    async def report_job_counts(self) -> None:
        """Set the strata_jobs gauge to the store's job counts by state."""
        counts = await run_in_threadpool(
            lambda: {status.value: self.store.count(status, kind=KIND) for status in JobStatus})
        self._job_metrics.report(counts)

    def delete_files_and_row(self, job_id: str) -> None:
        """Remove a finished job: its files first, then its row."""
        self.storage.delete_prefix(f"jobs/{job_id}")
        self.store.delete(job_id)

    # -- running one job -------------------------------------------------------

    async def _run(self, job: Job, owner: str) -> None:
        started = time.perf_counter()
        await self._publish_status(job.id)
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(job.id, owner))
        try:
            model, params = _model_call_params(job)
            rgba = await run_in_threadpool(lambda: imaging.decode_rgba_png(self.storage.get(input_key(job.id))))
            stream = for_payload(self._models[model], rgba.nbytes).options(stream=True).decompose.remote(rgba, params)
            self._streams[job.id] = stream
            layers, engine = None, None
            async for event in stream:
                if event["type"] == "progress":
                    step, total = event["step"], event["total"]
                    state = await run_in_threadpool(
                        lambda: self.store.renew(job.id, owner, self._lease_s, progress=step / total,
                                                 step=step, total_steps=total))
                    self._publish(job.id, "progress", {"id": job.id, "status": "running",
                                                       "progress": step / total, "step": step,
                                                       "total_steps": total, "at": _iso(event.get("at"))})
                    if state is Renewal.CANCEL_REQUESTED:
                        stream.cancel()
                        break
                    if state is Renewal.LOST:
                        stream.cancel()
                        return
                elif event["type"] == "layers":
                    layers, engine = event["layers"], event["engine"]
            if layers is None:
                await self._finish(job.id, owner, JobStatus.CANCELLED)
                return
            model_ms = (time.perf_counter() - started) * 1000
            # One finish time for the manifest and the row: the manifest is written first.
            finished_at = self.store.now()
            result = await run_in_threadpool(self._store_layers, job, layers, engine, model_ms, finished_at)
            await self._finish(job.id, owner, JobStatus.SUCCEEDED, result=result, now=finished_at)
        except asyncio.CancelledError:
            raise  # this ingress is stopping: the lease lapses and another dispatch resumes
        except Exception as exc:
            if _is_lost_worker(exc):
                # The model replica died (or cannot be reached): give the lease up so
                # the job is dispatched again now rather than after lease_s; Serve
                # routes it to a live replica, and max_attempts bounds the retries.
                logger.warning("layer job %s lost its model replica; dispatching it again", job.id)
                stream = self._streams.get(job.id)
                if stream is not None:
                    stream.cancel()  # an unreachable replica that is still alive stops the work
                await run_in_threadpool(self.store.release, job.id, owner)
                return
            if _is_cancellation(exc) or await run_in_threadpool(self._cancel_requested, job.id):
                await self._finish(job.id, owner, JobStatus.CANCELLED)
            else:
                logger.warning("layer job %s failed: %s", job.id, exc)
                await self._finish(job.id, owner, JobStatus.FAILED, error=_readable_error(exc))
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, job_id: str, owner: str) -> None:
        """Keep the lease while the model is silent (loading, queueing, decoding)."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            state = await run_in_threadpool(self.store.renew, job_id, owner, self._lease_s)
            if state is not Renewal.HELD:
                self.cancel_local(job_id)
                return

    def _cancel_requested(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and job.cancel_requested

    def cancel_local(self, job_id: str) -> None:
        """Interrupt the model call of a job running on this replica, if it is here."""
        stream = self._streams.get(job_id)
        if stream is not None:
            stream.cancel()

    async def _finish(self, job_id: str, owner: str, status: JobStatus, **outcome) -> None:
        await run_in_threadpool(lambda: self.store.finish(job_id, owner, status, **outcome))
        await self._publish_status(job_id)

    def _store_layers(self, job: Job, layers: list[np.ndarray], engine: str, model_ms: float,
                      finished_at: datetime) -> dict[str, Any]:
        names = [f"Layer {i} (background)" if i == 1 else f"Layer {i}" for i in range(1, len(layers) + 1)]
        for index, layer in enumerate(layers, start=1):
            self.storage.put(layer_key(job.id, index), imaging.encode_png(np.ascontiguousarray(layer)))
        info = exports.layer_info(layers, names)
        for entry in info:
            entry["url"] = f"/v1/jobs/{job.id}/layers/{entry['index']}.png"
        height, width = layers[0].shape[:2]
        queue_ms = ((job.started_at - job.created_at).total_seconds() * 1000) if job.started_at else 0.0
        manifest = exports.build_manifest(
            job_id=job.id, layers=info, width=width, height=height, model=job.params["model"], engine=engine,
            params=job.params, created_at=job.created_at, started_at=job.started_at, finished_at=finished_at,
            timings={"queue_ms": queue_ms, "model_ms": model_ms},
        )
        self.storage.put(manifest_key(job.id), json.dumps(manifest, indent=2).encode())
        return {
            "engine": engine,
            "model": job.params["model"],
            "width": width,
            "height": height,
            "layers": info,
            "zip_url": f"/v1/jobs/{job.id}/result.zip",
            "psd_url": f"/v1/jobs/{job.id}/result.psd",
            "pptx_url": f"/v1/jobs/{job.id}/result.pptx",
            "manifest_url": f"/v1/jobs/{job.id}/manifest.json",
            "timings": manifest["timings"],
            "warning": empty_layers_warning(info, engine),
        }

    # -- listeners (SSE, Prefer: wait) ----------------------------------------

    def subscribe(self, job_id: str) -> asyncio.Queue:
        """A queue of (event, data) for `job_id`, fed while the job runs here."""
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        listeners = self._listeners.get(job_id)
        if listeners is not None:
            listeners.discard(queue)
            if not listeners:
                del self._listeners[job_id]

    def _publish(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        for queue in self._listeners.get(job_id, ()):
            queue.put_nowait((event, data))

    async def _publish_status(self, job_id: str) -> None:
        if job_id in self._listeners:
            job = await run_in_threadpool(self.store.get, job_id)
            if job is not None:
                self._publish(job_id, "status", job_json(job))

    async def watch(self, job_id: str, poll_s: float = 0.5) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events of one job until it ends: ("status", job) on each status change
        (first the current one), ("progress", {...}) per step. Jobs running on
        another replica are followed through the database."""
        queue = self.subscribe(job_id)
        try:
            job = await run_in_threadpool(self.store.get, job_id)
            if job is None:
                return
            last_status, last_step = job.status, job.step
            yield "status", job_json(job)
            while not job.terminal:
                try:
                    event, data = await asyncio.wait_for(queue.get(), poll_s)
                    if event == "progress":
                        last_step = data["step"]
                        yield event, data
                        continue
                except TimeoutError:
                    pass
                job = await run_in_threadpool(self.store.get, job_id)
                if job is None:
                    return
                # Steps come from one source: the runner's events for a job running here
                # (in order, with their time; the store may already hold a later step than
                # the queue has delivered), the store for a job running elsewhere.
                if (job.status == JobStatus.RUNNING and job.step is not None and job.step != last_step
                        and job_id not in self._running):
                    last_step = job.step
                    yield "progress", {"id": job.id, "status": "running", "progress": job.progress,
                                       "step": job.step, "total_steps": job.total_steps, "at": None}
                if job.status != last_status:
                    last_status = job.status
                    yield "status", job_json(job)
        finally:
            self.unsubscribe(job_id, queue)


def empty_layers_warning(layers: list[dict[str, Any]], engine: str) -> str | None:
    """What to tell the user when fewer layers have content than were asked for (a photo
    through the classic engine: the whole image in layer 1, the rest empty)."""
    filled = sum(1 for layer in layers if layer["bbox"] is not None)
    if filled == len(layers):
        return None
    warning = f"only {filled} of the {len(layers)} layers asked for have content: the {engine} engine found fewer parts"
    if engine == "classic":
        warning += "; it is made for flat graphics (posters, logos, UI), not photos, which need Qwen-Image-Layered"
    return warning


def job_json(job: Job) -> dict[str, Any]:
    """The public JSON of a job (`GET /v1/jobs/{id}`)."""
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status.value,
        "progress": job.progress,
        "step": job.step,
        "total_steps": job.total_steps,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "params": job.params,
        "error": job.error,
        "result": job.result,
        "warning": (job.result or {}).get("warning"),
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
    }


def _model_call_params(job: Job) -> tuple[str, dict[str, Any]]:
    """The model of a job's row and the parameters its model call takes. A row that lacks
    one (written by hand, or by another version) is a ValueError that names it, so the
    job fails with that reason instead of its dispatch failing attempt after attempt."""
    keys = ("layers", "resolution", "steps", "seed", "prompt", "true_cfg_scale")
    missing = [key for key in ("model", *keys) if key not in job.params]
    if missing:
        raise ValueError(f"the job's parameters lack {', '.join(missing)}")
    return job.params["model"], {key: job.params[key] for key in keys}


def _iso(epoch_s: float | None) -> str | None:
    """An epoch time as the ISO-8601 UTC string the job JSON uses; None stays None."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat() if epoch_s is not None else None


def _is_cancellation(exc: BaseException) -> bool:
    from ray.serve.exceptions import RequestCancelledError

    if isinstance(exc, RequestCancelledError):
        return True
    return "DecompositionCancelled" in f"{type(exc).__name__} {exc}"


def _is_lost_worker(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


def _readable_error(exc: BaseException) -> str:
    if callable(getattr(exc, "details", None)) and callable(getattr(exc, "code", None)):
        # A gRPC error (calls between deployments): its str() is a multi-line repr.
        return f"{exc.code().name}: {exc.details()}"[:500]
    text = str(exc).strip().splitlines()
    # Ray wraps remote errors in a traceback; the last line is the error itself.
    return (text[-1] if text else type(exc).__name__)[:500]
