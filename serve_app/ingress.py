"""The ingress deployment: FastAPI routes that validate, call a model, encode.

It owns HTTP and the CPU-side image work (decode, resize, composite, encode), so
model replicas receive model-sized uint8 arrays. It never imports torch.
"""


import asyncio
import json
import re
import time
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from deployments.decomposition import layer_deployment_name
from deployments.engine import EngineInfo
from serve_app import exports, imaging
from serve_app.config import AppConfig
from serve_app.jobs import Job, JobStatus, JobStore, QueueFull, new_job_id
from serve_app.layer_jobs import KIND, LayerJobRunner, input_key, job_json, layer_key, manifest_key
from serve_app.problems import ProblemError, install_problem_handlers
from serve_app.schemas import (
    PROBLEM_RESPONSES,
    Health,
    JobList,
    JobView,
    LayersParams,
    ModelHealth,
    RemoveBackgroundParams,
)
from serve_app.storage import LocalStorage
from serve_app.uploads import read_upload

app = FastAPI(
    title="Strata",
    version="1",
    summary="Background removal and layer decomposition, self-hosted on Ray Serve.",
)
install_problem_handlers(app)

# The web UI: static files of frontend/ (the repository root is the parent of serve_app/).
FRONTEND_DIR = FilePath(__file__).resolve().parent.parent / "frontend"
app.mount("/static", StaticFiles(directory=FRONTEND_DIR, check_dir=False), name="static")


@app.get("/", include_in_schema=False)
async def web_ui() -> FileResponse:
    return FileResponse(FRONTEND_DIR / "index.html", headers={"Cache-Control": "no-cache"})


JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary",
                                             "description": "JPEG, PNG, WebP, BMP or TIFF"}},
                }
            }
        },
    }
}


async def _await(response):
    return await response


async def _model_health(handle: DeploymentHandle) -> ModelHealth:
    try:
        report = await asyncio.wait_for(_await(handle.health.remote()), 10)
    except Exception as exc:  # a model that cannot answer is reported, not raised
        return ModelHealth(loaded=False, last_error=f"{type(exc).__name__}: {exc}")
    return ModelHealth(**report)


def _prefer_wait(prefer: str | None) -> float:
    """N of an RFC 7240 `Prefer: wait=N` header; 0 without one."""
    match = re.search(r"(?:^|[;,\s])wait\s*=\s*(\d+(?:\.\d+)?)", prefer or "")
    return float(match.group(1)) if match else 0.0


def _replica_states() -> dict[str, dict[str, int]]:
    """Replica counts by state for each deployment of this application."""
    app_name = serve.get_replica_context().app_name
    application = serve.status().applications.get(app_name)
    if application is None:
        return {}
    return {name: {str(state): count for state, count in status.replica_states.items()}
            for name, status in application.deployments.items()}


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(app)
class Ingress:
    """HTTP front of Strata: one instance per ingress replica."""

    async def __init__(self, config: AppConfig, segmenters: dict[str, DeploymentHandle],
                       decomposers: dict[str, DeploymentHandle]):
        self._config = config
        self._segmenters = segmenters
        self._decomposers = decomposers
        self._limits = imaging.ImageLimits(max_pixels=config.limits.max_pixels, min_side=config.limits.min_side)
        self._engine_infos: dict[str, EngineInfo] = {}
        jobs = config.jobs
        store = await run_in_threadpool(JobStore, jobs.url)
        storage = LocalStorage(FilePath(jobs.data_dir).resolve())
        self._jobs = LayerJobRunner(store, storage, decomposers, max_running=jobs.max_running,
                                    lease_s=jobs.lease_s, max_attempts=jobs.max_attempts,
                                    retention_s=jobs.retention_h * 3600)
        if decomposers:
            self._jobs.start()

    @app.get("/healthz", summary="Liveness: the ingress answers (no model calls)")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.post(
        "/v1/remove-background",
        summary="Remove the background of an image",
        response_class=Response,
        responses={
            200: {"description": "The cutout or mask",
                  "content": {"image/png": {}, "image/webp": {}}},
            **PROBLEM_RESPONSES,
        },
        openapi_extra=_IMAGE_BODY,
    )
    async def remove_background(self, request: Request,
                                params: Annotated[RemoveBackgroundParams, Query()]) -> Response:
        started = time.perf_counter()
        model = self._model_name(params.model)
        bg_color = imaging.parse_hex_color(params.bg_color) if params.bg_color else None
        data = await read_upload(request, "image", self._config.limits.max_upload_bytes)
        image = await run_in_threadpool(self._decode, data)
        mask, engine, batch_size = await self._segment(model, image.rgb)
        # render_cutout resizes the model-sized mask to the image in the same thread hop.
        rendered = await run_in_threadpool(
            imaging.render_cutout, image, mask, output=params.output, format=params.format,
            bg_color=bg_color, crop=params.crop, refine_foreground=params.refine_foreground,
        )
        return Response(
            rendered.data,
            media_type=rendered.media_type,
            headers={
                "X-Model": model,
                "X-Engine": engine,
                "X-Batch-Size": str(batch_size),
                "X-Processing-Ms": f"{(time.perf_counter() - started) * 1000:.1f}",
                "X-Width": str(rendered.width),
                "X-Height": str(rendered.height),
            },
        )

    @app.get("/v1/health", summary="Each model's engine, device and replicas", response_model=Health)
    async def health(self) -> Health:
        replicas = await run_in_threadpool(_replica_states)
        seg_names, layer_names = list(self._segmenters), list(self._decomposers)
        answers = await asyncio.gather(*(_model_health(h) for h in self._segmenters.values()),
                                       *(_model_health(h) for h in self._decomposers.values()))
        models = dict(zip(seg_names, answers[:len(seg_names)]))
        layer_models = dict(zip(layer_names, answers[len(seg_names):]))
        for name, model_health in models.items():
            model_health.replicas = replicas.get(name, {})
        for name, model_health in layer_models.items():
            model_health.replicas = replicas.get(layer_deployment_name(name), {})
        everything = [*models.values(), *layer_models.values()]
        status = "ok" if all(m.loaded for m in everything) else "degraded"
        return Health(status=status, default_model=self._config.default_model, models=models,
                      default_layer_model=self._config.default_layer_model, layer_models=layer_models)

    # -- layer jobs --------------------------------------------------------------

    @app.post(
        "/v1/layers",
        summary="Decompose an image into RGBA layers (a job)",
        status_code=202,
        response_model=JobView,
        responses={200: {"description": "The finished job (with `Prefer: wait=N`)", "model": JobView},
                   **PROBLEM_RESPONSES},
        openapi_extra=_IMAGE_BODY,
    )
    async def create_layers_job(self, request: Request, params: Annotated[LayersParams, Query()],
                                prefer: Annotated[str | None, Header(
                                    description="`wait=N`: answer 200 with the finished job if it ends within N s")] = None,
                                ) -> Response:
        model = self._layer_model_name(params.model)
        data = await read_upload(request, "image", self._config.limits.max_upload_bytes)
        image = await run_in_threadpool(self._decode, data)
        job_params = {**params.model_dump(), "model": model, "width": image.width, "height": image.height}
        job_id = new_job_id()
        storage, store = self._jobs.storage, self._jobs.store
        # The input first, then the row: a dispatcher never sees a job without its input.
        input_png = await run_in_threadpool(lambda: imaging.encode_png(imaging.to_rgba(image)))
        await run_in_threadpool(storage.put, input_key(job_id), input_png)
        try:
            job = await run_in_threadpool(lambda: store.create(
                KIND, job_params, max_queued=self._config.jobs.max_queued, job_id=job_id))
        except QueueFull as exc:
            await run_in_threadpool(storage.delete_prefix, f"jobs/{job_id}")
            raise ProblemError(503, "Busy", f"{exc.queued} layer jobs are queued (the limit is {exc.limit}); "
                               "retry shortly", slug="queue-full",
                               headers={"Retry-After": str(self._config.retry_after_s)}) from exc
        self._jobs.wake()
        wait_s = min(_prefer_wait(prefer), self._config.jobs.max_wait_s)
        headers = {"Location": f"/v1/jobs/{job.id}"}
        if wait_s > 0:
            job = await self._wait_for_end(job, wait_s)
            headers["Preference-Applied"] = f"wait={wait_s:g}"
        return JSONResponse(job_json(job), status_code=200 if job.terminal else 202, headers=headers)

    @app.get("/v1/jobs", summary="List jobs, newest first", response_model=JobList,
             responses=PROBLEM_RESPONSES)
    async def list_jobs(self,
                        status: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                                          Query(description="Only jobs in this state")] = None,
                        limit: Annotated[int, Query(ge=1, le=100)] = 20,
                        cursor: Annotated[str | None, Query(max_length=200)] = None) -> JobList:
        try:
            jobs, next_cursor = await run_in_threadpool(
                lambda: self._jobs.store.list(status=status, limit=limit, cursor=cursor))
        except ValueError as exc:
            raise ProblemError(422, "Invalid parameters", f"cursor: {exc}", slug="invalid-parameters") from exc
        return JobList(jobs=[JobView(**job_json(job)) for job in jobs], next_cursor=next_cursor)

    @app.get("/v1/jobs/{job_id}", summary="A job's state, progress and result", response_model=JobView,
             responses=PROBLEM_RESPONSES)
    async def get_job(self, job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)]) -> JobView:
        return JobView(**job_json(await self._job(job_id)))

    @app.get("/v1/jobs/{job_id}/events", summary="Server-Sent Events: progress until the job ends",
             response_class=EventSourceResponse,
             responses={200: {"description": "`status` events (the job) and `progress` events (per step)",
                              "content": {"text/event-stream": {}}}, **PROBLEM_RESPONSES})
    async def job_events(self, job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)]):
        await self._job(job_id)

        async def events():
            async for event, data in self._jobs.watch(job_id):
                yield {"event": event, "data": json.dumps(data)}

        return EventSourceResponse(events(), ping=15)

    @app.delete("/v1/jobs/{job_id}", summary="Cancel a queued/running job; delete a finished one",
                status_code=204,
                responses={202: {"description": "Cancellation requested (the job)", "model": JobView},
                           204: {"description": "Deleted with its files"}, **PROBLEM_RESPONSES})
    async def delete_job(self, job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)]) -> Response:
        job = await self._job(job_id)
        if job.terminal:
            await run_in_threadpool(self._jobs.delete_files_and_row, job_id)
            return Response(status_code=204)
        job = await run_in_threadpool(self._jobs.store.request_cancel, job_id)
        self._jobs.cancel_local(job_id)
        self._jobs.wake()
        return JSONResponse(job_json(job), status_code=202)

    @app.get("/v1/jobs/{job_id}/layers/{index}.png", summary="One layer (1 = bottom), full canvas RGBA PNG",
             response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}}, **PROBLEM_RESPONSES})
    async def get_layer(self, job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)],
                        index: Annotated[int, Path(ge=1, le=100)]) -> FileResponse:
        job = await self._finished_job(job_id)
        if index > len(job.result["layers"]):
            raise ProblemError(404, "Not found", f"job {job_id} has {len(job.result['layers'])} layers",
                               slug="not-found")
        return FileResponse(self._jobs.storage.path(layer_key(job_id, index)), media_type="image/png")

    @app.get("/v1/jobs/{job_id}/result.zip", summary="All layers as layer_01.png, ... plus manifest.json",
             response_class=Response, responses={200: {"content": {"application/zip": {}}}, **PROBLEM_RESPONSES})
    async def get_zip(self, job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)]) -> Response:
        job = await self._finished_job(job_id)
        data = await run_in_threadpool(self._zip, job)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'})

    @app.get("/v1/jobs/{job_id}/result.psd", summary="All layers as one PSD (named pixel layers, bottom first)",
             response_class=Response,
             responses={200: {"content": {"image/vnd.adobe.photoshop": {}}}, **PROBLEM_RESPONSES})
    async def get_psd(self, job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)]) -> Response:
        job = await self._finished_job(job_id)
        data = await run_in_threadpool(self._psd, job)
        return Response(data, media_type="image/vnd.adobe.photoshop",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.psd"'})

    @app.get("/v1/jobs/{job_id}/manifest.json", summary="Layer order, names, sizes, boxes, params, timings",
             responses=PROBLEM_RESPONSES)
    async def get_manifest(self, job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)]) -> Response:
        await self._finished_job(job_id)
        return FileResponse(self._jobs.storage.path(manifest_key(job_id)), media_type="application/json")

    async def _job(self, job_id: str) -> Job:
        job = await run_in_threadpool(self._jobs.store.get, job_id)
        if job is None:
            raise ProblemError(404, "Not found", f"there is no job {job_id}", slug="not-found")
        return job

    async def _finished_job(self, job_id: str) -> Job:
        job = await self._job(job_id)
        if job.status != JobStatus.SUCCEEDED:
            raise ProblemError(404, "Not found", f"job {job_id} is {job.status.value}; results exist once it "
                               "has succeeded", slug="no-result")
        return job

    async def _wait_for_end(self, job: Job, wait_s: float) -> Job:
        async def ended() -> None:
            async for event, _ in self._jobs.watch(job.id):
                pass

        try:
            await asyncio.wait_for(ended(), wait_s)
        except TimeoutError:
            pass
        return await self._job(job.id)

    def _zip(self, job: Job) -> bytes:
        storage = self._jobs.storage
        count = len(job.result["layers"])
        pngs = [storage.get(layer_key(job.id, index)) for index in range(1, count + 1)]
        manifest = json.loads(storage.get(manifest_key(job.id)))
        return exports.layers_zip(pngs, manifest=manifest)

    def _psd(self, job: Job) -> bytes:
        storage = self._jobs.storage
        key = f"jobs/{job.id}/result.psd"
        if storage.exists(key):  # built once, on first download
            return storage.get(key)
        layers = [imaging.decode_rgba_png(storage.get(layer_key(job.id, entry["index"])))
                  for entry in job.result["layers"]]
        data = exports.layers_psd(layers, [entry["name"] for entry in job.result["layers"]])
        storage.put(key, data)
        return data

    def _layer_model_name(self, requested: str | None) -> str:
        name = requested or self._config.default_layer_model
        if not self._decomposers:
            raise ProblemError(404, "Not available", "this deployment serves no layer-decomposition model",
                               slug="no-layer-model")
        if name not in self._decomposers:
            raise ProblemError(422, "Unknown model",
                               f"model {name!r} is not a layer model here; choose one of: "
                               f"{', '.join(self._decomposers)}", slug="unknown-model")
        return name

    def _model_name(self, requested: str | None) -> str:
        name = requested or self._config.default_model
        if name not in self._segmenters:
            raise ProblemError(422, "Unknown model",
                               f"model {name!r} is not served here; choose one of: {', '.join(self._segmenters)}",
                               slug="unknown-model")
        return name

    def _decode(self, data: bytes) -> imaging.DecodedImage:
        try:
            return imaging.decode_image(data, self._limits)
        except imaging.ImageRejected as exc:
            raise ProblemError(exc.status, exc.title, exc.detail, slug=exc.code) from exc

    async def _segment(self, model: str, rgb: np.ndarray) -> tuple[np.ndarray, str, int]:
        handle = self._segmenters[model]
        info = self._engine_infos.get(model)
        if info is None:
            info = self._engine_infos[model] = await self._model_call(model, handle.info.remote())
        height, width = rgb.shape[:2]
        size = imaging.model_input_size(width, height, info.input_size, info.max_side)
        # Most inputs need a resize; one already the size to send skips the thread hop.
        model_input = rgb if size == (width, height) else await run_in_threadpool(imaging.resize_image, rgb, size)
        result = await self._model_call(model, handle.segment.remote(model_input))
        return result.mask, result.engine, result.batch_size

    async def _model_call(self, model: str, response) -> Any:
        """Await a model call, turning overload and outages into 503s."""
        retry = {"Retry-After": str(self._config.retry_after_s)}
        try:
            return await asyncio.wait_for(_await(response), self._config.model_timeout_s)
        except BackPressureError as exc:
            raise ProblemError(503, "Busy", f"model {model!r} has a full queue; retry shortly",
                               slug="busy", headers=retry) from exc
        except TimeoutError as exc:
            response.cancel()
            raise ProblemError(503, "Model timeout",
                               f"model {model!r} did not answer within {self._config.model_timeout_s:g} s",
                               slug="model-timeout", headers=retry) from exc
        except (DeploymentUnavailableError, RayServeException) as exc:
            raise ProblemError(503, "Model unavailable", f"model {model!r} is unavailable: {exc}",
                               slug="model-unavailable", headers=retry) from exc


