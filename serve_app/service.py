"""What the HTTP routes share: one `StrataService` per ingress replica.

It holds the model handles and the job runner and does the work behind every
route family (Strata's own `/v1`, and the compatible APIs of other projects):
decode and limit an upload, call a model, render a cutout, accept and read
layer jobs and their files. Routes parse HTTP and shape answers; they reach the
service through the FastAPI dependency `CurrentService`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import Depends
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from deployments.decomposition import layer_deployment_name
from deployments.engine import EngineInfo
from deployments.metrics import RequestMetrics
from deployments.segmentation import Segmentation
from serve_app import exports, imaging
from serve_app.access import AccessControl
from serve_app.config import AppConfig
from serve_app.cpu_steps import CpuSteps
from serve_app.jobs import JOB_ID_PATTERN, Job, JobStatus, JobStore, QueueFull, new_job_id
from serve_app.layer_jobs import KIND, LayerJobRunner, input_key, layer_key, manifest_key
from serve_app.problems import ProblemError
from serve_app.schemas import Health, LayersParams, ModelHealth, RemoveBackgroundParams
from serve_app.storage import open_storage
from serve_app.transport import for_payload
from serve_app.url_inputs import UrlFetcher


@dataclass(frozen=True)
class ServerTiming:
    """Where a background removal's time went in the ingress, in ms: its `Server-Timing` header."""

    decode_ms: float
    model_ms: float  # to the model and back: any resize, the call (a batch's wait included)
    engine_ms: float  # the engine's own call in the model replica (within model_ms; its whole batch)
    render_ms: float = 0.0  # set once rendered

    def header(self) -> str:
        """The `Server-Timing` value (W3C Server Timing): `decode;dur=1.4, model;dur=...`."""
        steps = {"decode": self.decode_ms, "model": self.model_ms, "engine": self.engine_ms, "render": self.render_ms}
        return ", ".join(f"{name};dur={ms:.1f}" for name, ms in steps.items())


@dataclass(frozen=True)
class Cutout:
    """A rendered background removal and how it was made."""

    rendered: imaging.RenderedImage
    model: str
    engine: str
    batch_size: int
    processing_ms: float
    timing: ServerTiming
    warning: str | None = None  # the engine's word that the cutout is likely poor (X-Engine-Warning)


@dataclass(frozen=True)
class Matte:
    """An image and the alpha a model gave it (limited by the image's own alpha)."""

    image: imaging.DecodedImage
    alpha: np.ndarray
    input_size: tuple[int, int]  # (width, height) as uploaded, before any downscale
    model: str
    engine: str
    batch_size: int
    started: float  # time.perf_counter() when the work began
    timing: ServerTiming
    warning: str | None = None  # the engine's word that the alpha is likely poor

    def elapsed_ms(self) -> float:
        return _ms_since(self.started)

    @property
    def pixels(self) -> int:
        """The image's pixel count: what its render costs (`CpuSteps.run`)."""
        return self.image.width * self.image.height


def engine_headers(result: Cutout | Matte) -> dict[str, str]:
    """Which model and engine made `result`, and the engine's warning when it gave one
    (`X-Engine-Warning`: the result is still returned, the client should know)."""
    headers = {"X-Model": result.model, "X-Engine": result.engine}
    if result.warning:
        headers["X-Engine-Warning"] = result.warning
    return headers


# What /v1/health tells the user of a weights-free engine about the real models (the web
# page's note shows it beside the engine's results; /setup is README's "On a GPU box").
REAL_CUTOUT_MODELS_SETUP = (
    "for photos, serve BiRefNet or RMBG-2.0: scripts/fetch_models.py fetches their weights (RMBG-2.0 is "
    "gated: accept its terms on huggingface.co, set HF_TOKEN); README, \"On a GPU box\" (/setup)"
)
REAL_LAYER_MODELS_SETUP = (
    "for photos, serve Qwen-Image-Layered (a GPU model): scripts/fetch_models.py fetches its weights; "
    "README, \"On a GPU box\" (/setup)"
)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def _await(response):
    return await response


async def _model_health(handle: DeploymentHandle) -> ModelHealth:
    try:
        report = await asyncio.wait_for(_await(handle.health.remote()), 10)
    except Exception as exc:  # a model that cannot answer is reported, not raised
        return ModelHealth(loaded=False, last_error=f"{type(exc).__name__}: {exc}")
    return ModelHealth(**report)


def _replica_states() -> dict[str, dict[str, int]]:
    """Replica counts by state for each deployment of this application."""
    app_name = serve.get_replica_context().app_name
    application = serve.status().applications.get(app_name)
    if application is None:
        return {}
    return {name: {str(state): count for state, count in status.replica_states.items()}
            for name, status in application.deployments.items()}


class StrataService:
    """The models, the job runner and the operations routes are made of."""

    def __init__(self, config: AppConfig, segmenters: dict[str, DeploymentHandle],
                 decomposers: dict[str, DeploymentHandle], jobs: LayerJobRunner, access: AccessControl):
        self.config = config
        self.access = access
        self.segmenters = segmenters
        self.decomposers = decomposers
        self.jobs = jobs
        self._limits = imaging.ImageLimits(max_pixels=config.limits.max_pixels, min_side=config.limits.min_side)
        self._engine_infos: dict[str, EngineInfo] = {}
        self.cpu_steps = CpuSteps()
        self.request_metrics = RequestMetrics()
        urls = config.url_inputs
        self._url_fetcher = UrlFetcher(max_bytes=config.url_max_bytes, timeout_s=urls.timeout_s,
                                       max_redirects=urls.max_redirects,
                                       allow_private_networks=urls.allow_private_networks)

    @classmethod
    async def create(cls, config: AppConfig, segmenters: dict[str, DeploymentHandle],
                     decomposers: dict[str, DeploymentHandle]) -> "StrataService":
        """Read the API keys, open the job store and storage, and start dispatching layer jobs."""
        access = await run_in_threadpool(AccessControl.from_config, config.auth, os.environ)
        jobs = config.jobs
        store = await run_in_threadpool(JobStore, jobs.url)
        storage = open_storage(jobs)
        runner = LayerJobRunner(store, storage, decomposers, max_running=jobs.max_running,
                                lease_s=jobs.lease_s, max_attempts=jobs.max_attempts,
                                retention_s=jobs.retention_h * 3600)
        if decomposers:
            runner.start()
        return cls(config, segmenters, decomposers, runner, access)

    # -- images ----------------------------------------------------------------

    def decode(self, data: bytes) -> imaging.DecodedImage:
        """The upload as an RGB(A) image within the configured limits, or a 4xx."""
        try:
            return imaging.decode_image(data, self._limits)
        except imaging.ImageRejected as exc:
            raise ProblemError(exc.status, exc.title, exc.detail, slug=exc.code) from exc

    def image_pixels(self, data: bytes) -> int:
        """The upload's pixel count from its header, within the configured limits, or a 4xx."""
        try:
            return imaging.image_pixels(data, self._limits)
        except imaging.ImageRejected as exc:
            raise ProblemError(exc.status, exc.title, exc.detail, slug=exc.code) from exc

    async def fetch_image_url(self, url: str) -> bytes:
        """The bytes at `url`, fetched within the `url_inputs` limits from public addresses
        only (see serve_app/url_inputs.py), or a 4xx."""
        if not self.config.url_inputs.enabled:
            raise ProblemError(422, "URL inputs disabled", "this deployment does not fetch image URLs; "
                               "upload the image instead", slug="url-inputs-disabled")
        return await self._url_fetcher.fetch(url)

    async def remove_background(self, data: bytes, params: RemoveBackgroundParams) -> Cutout:
        """Decode `data`, segment it with the requested model and render the answer."""
        bg_color = imaging.parse_hex_color(params.bg_color) if params.bg_color else None
        with self.cpu_steps.request():
            matte = await self.matte(data, self.model_name(params.model))
            render_started = time.perf_counter()
            rendered = await self.cpu_steps.run(
                matte.pixels, imaging.render_cutout, matte.image, matte.alpha, output=params.output,
                format=params.format, bg_color=bg_color, crop=params.crop, refine_foreground=params.refine_foreground,
            )
        timing = replace(matte.timing, render_ms=_ms_since(render_started))
        return Cutout(rendered, matte.model, matte.engine, matte.batch_size, matte.elapsed_ms(), timing, matte.warning)

    async def matte(self, data: bytes, model: str, *, max_pixels: int | None = None) -> Matte:
        """Decode `data` (shrunk to at most `max_pixels` when given) and segment it with
        the served model `model`: the image and its alpha, ready to render. Its CPU steps
        run where `cpu_steps` says: the caller counts the request in `cpu_steps.request()`."""
        started = time.perf_counter()
        pixels = self.image_pixels(data)
        image = await self.cpu_steps.run(pixels, self.decode, data)
        input_size = (image.width, image.height)
        if max_pixels is not None:
            image = await self.cpu_steps.run(pixels, imaging.downscale_to_pixels, image, max_pixels)
        decode_ms = _ms_since(started)
        model_started = time.perf_counter()
        full_mask, result = await self.alpha_mask(model, image)
        timing = ServerTiming(decode_ms=decode_ms, model_ms=_ms_since(model_started), engine_ms=result.engine_ms)
        alpha = (full_mask if image.alpha is None
                 else await self.cpu_steps.run(full_mask.size, np.minimum, full_mask, image.alpha))
        return Matte(image, alpha, input_size, model, result.engine, result.batch_size, started, timing, result.warning)

    async def alpha_mask(self, model: str, image: imaging.DecodedImage) -> tuple[np.ndarray, Segmentation]:
        """The image-sized alpha mask of `model`, and the model's answer (engine, batch size, time)."""
        handle = self.segmenters[model]
        info = self._engine_infos.get(model)
        if info is None:
            info = self._engine_infos[model] = await self._model_call(model, handle.info.remote())
        image_size = (image.width, image.height)
        size = imaging.model_input_size(*image_size, info.input_size, info.max_side)
        # An image already the size to send skips the resize and its thread hop; its mask, the way back.
        pixels = image.width * image.height
        model_input = (image.rgb if size == image_size
                       else await self.cpu_steps.run(pixels, imaging.resize_image, image.rgb, size))
        result = await self._model_call(model, for_payload(handle, model_input.nbytes).segment.remote(model_input))
        full_mask = (result.mask if result.mask.shape[::-1] == image_size
                     else await self.cpu_steps.run(pixels, imaging.resize_mask, result.mask, image_size))
        return full_mask, result

    def model_name(self, requested: str | None) -> str:
        """The served segmentation model `requested` names (the default when None), or a 422."""
        name = requested or self.config.default_model
        if name not in self.segmenters:
            raise ProblemError(422, "Unknown model",
                               f"model {name!r} is not served here; choose one of: {', '.join(self.segmenters)}",
                               slug="unknown-model")
        return name

    async def _model_call(self, model: str, response) -> Any:
        """Await a model call, turning overload and outages into 503s."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        try:
            return await asyncio.wait_for(_await(response), self.config.model_timeout_s)
        except BackPressureError as exc:
            raise ProblemError(503, "Busy", f"model {model!r} has a full queue; retry shortly",
                               slug="busy", headers=retry) from exc
        except TimeoutError as exc:
            response.cancel()
            raise ProblemError(503, "Model timeout",
                               f"model {model!r} did not answer within {self.config.model_timeout_s:g} s",
                               slug="model-timeout", headers=retry) from exc
        except RayActorError as exc:  # the replica died during the call; Serve starts another
            raise ProblemError(503, "Model unavailable", f"model {model!r} lost its replica; retry shortly",
                               slug="model-unavailable", headers=retry) from exc
        except (DeploymentUnavailableError, RayServeException) as exc:
            raise ProblemError(503, "Model unavailable", f"model {model!r} is unavailable: {exc}",
                               slug="model-unavailable", headers=retry) from exc

    # -- health ----------------------------------------------------------------

    async def health(self) -> Health:
        """Every model's engine, device and replicas, as its replicas report them."""
        replicas = await run_in_threadpool(_replica_states)
        seg_names, layer_names = list(self.segmenters), list(self.decomposers)
        answers = await asyncio.gather(*(_model_health(h) for h in self.segmenters.values()),
                                       *(_model_health(h) for h in self.decomposers.values()))
        models = dict(zip(seg_names, answers[:len(seg_names)]))
        layer_models = dict(zip(layer_names, answers[len(seg_names):]))
        for name, model_health in models.items():
            model_health.replicas = replicas.get(name, {})
            if model_health.engine_about:  # a weights-free engine serves: where the real ones are
                model_health.real_models_setup = REAL_CUTOUT_MODELS_SETUP
        for name, model_health in layer_models.items():
            model_health.replicas = replicas.get(layer_deployment_name(name), {})
            if model_health.engine_about:
                model_health.real_models_setup = REAL_LAYER_MODELS_SETUP
        everything = [*models.values(), *layer_models.values()]
        status = "ok" if all(m.loaded for m in everything) else "degraded"
        return Health(status=status, default_model=self.config.default_model, models=models,
                      default_layer_model=self.config.default_layer_model, layer_models=layer_models)

    # -- layer jobs --------------------------------------------------------------

    # Every job operation takes the caller's `owner` (serve_app.access.request_owner):
    # a key sees only the jobs it created, and another key's job is "not found"
    # (not "forbidden"), so ids are not confirmed. None (no keys configured): all jobs.

    async def submit_layer_job(self, data: bytes, params: LayersParams, *, owner: str | None) -> Job:
        """Accept a decomposition of `data` as a queued job of `owner`, or answer 503 when the queue is full."""
        model = self.layer_model_name(params.model)
        image = await run_in_threadpool(self.decode, data)
        job_params = {**params.model_dump(exclude={"image_url"}), "model": model, "width": image.width, "height": image.height}
        job_id = new_job_id()
        storage, store = self.jobs.storage, self.jobs.store
        # The input first, then the row: a dispatcher never sees a job without its input.
        input_png = await run_in_threadpool(lambda: imaging.encode_png(imaging.to_rgba(image)))
        await run_in_threadpool(storage.put, input_key(job_id), input_png)
        try:
            job = await run_in_threadpool(lambda: store.create(
                KIND, job_params, max_queued=self.config.jobs.max_queued, owner=owner, job_id=job_id))
        except QueueFull as exc:
            await run_in_threadpool(storage.delete_prefix, f"jobs/{job_id}")
            raise ProblemError(503, "Busy", f"{exc.queued} layer jobs are queued (the limit is {exc.limit}); "
                               "retry shortly", slug="queue-full",
                               headers={"Retry-After": str(self.config.retry_after_s)}) from exc
        self.jobs.wake()
        return job

    def layer_model_name(self, requested: str | None) -> str:
        """The served layer model `requested` names (the default when None), or a 4xx."""
        name = requested or self.config.default_layer_model
        if not self.decomposers:
            raise ProblemError(404, "Not available", "this deployment serves no layer-decomposition model",
                               slug="no-layer-model")
        if name not in self.decomposers:
            raise ProblemError(422, "Unknown model",
                               f"model {name!r} is not a layer model here; choose one of: "
                               f"{', '.join(self.decomposers)}", slug="unknown-model")
        return name

    async def job(self, job_id: str, *, owner: str | None) -> Job:
        """The job when `owner` may see it, or a 404 (also for an id no job can have,
        without asking the store)."""
        job = await run_in_threadpool(self.jobs.store.get, job_id) if JOB_ID_PATTERN.fullmatch(job_id) else None
        if job is None or (owner is not None and job.owner != owner):
            raise ProblemError(404, "Not found", f"there is no job {job_id}", slug="not-found")
        return job

    async def finished_job(self, job_id: str, *, owner: str | None) -> Job:
        """The job when it has succeeded (its results exist) and `owner` may see it, or a 404."""
        job = await self.job(job_id, owner=owner)
        if job.status != JobStatus.SUCCEEDED:
            raise ProblemError(404, "Not found", f"job {job_id} is {job.status.value}; results exist once it "
                               "has succeeded", slug="no-result")
        return job

    async def wait_for_end(self, job: Job, wait_s: float) -> Job:
        """The job once it ended, or as it is after `wait_s` seconds."""
        async def ended() -> None:
            async for _ in self.jobs.watch(job.id):
                pass

        try:
            await asyncio.wait_for(ended(), wait_s)
        except TimeoutError:
            pass
        return await self.job(job.id, owner=job.owner)

    async def list_jobs(self, *, status: str | None, limit: int, cursor: str | None,
                        owner: str | None) -> tuple[list[Job], str | None]:
        """A page of `owner`'s jobs, newest first, and the cursor of the next page."""
        try:
            return await run_in_threadpool(
                lambda: self.jobs.store.list(status=status, limit=limit, cursor=cursor, owner=owner))
        except ValueError as exc:
            raise ProblemError(422, "Invalid parameters", f"cursor: {exc}", slug="invalid-parameters") from exc

    async def cancel_or_delete(self, job_id: str, *, owner: str | None) -> Job | None:
        """Ask a queued/running job to stop (the job), or delete a finished one with its files (None)."""
        job = await self.job(job_id, owner=owner)
        if job.terminal:
            await run_in_threadpool(self.jobs.delete_files_and_row, job_id)
            return None
        job = await run_in_threadpool(self.jobs.store.request_cancel, job_id)
        self.jobs.cancel_local(job_id)
        self.jobs.wake()
        return job

    # -- job results ---------------------------------------------------------------

    async def layer_png(self, job_id: str, index: int, *, owner: str | None) -> bytes:
        """Layer `index` (1 = bottom) of a finished job as PNG bytes, or a 404."""
        job = await self.finished_job(job_id, owner=owner)
        if index > len(job.result["layers"]):
            raise ProblemError(404, "Not found", f"job {job_id} has {len(job.result['layers'])} layers",
                               slug="not-found")
        return await run_in_threadpool(self.jobs.storage.get, layer_key(job_id, index))

    async def manifest(self, job_id: str, *, owner: str | None) -> bytes:
        """The manifest of a finished job (JSON bytes)."""
        await self.finished_job(job_id, owner=owner)
        return await run_in_threadpool(self.jobs.storage.get, manifest_key(job_id))

    async def layers_zip(self, job_id: str, *, owner: str | None) -> bytes:
        """All layers of a finished job and its manifest as one ZIP."""
        job = await self.finished_job(job_id, owner=owner)
        return await run_in_threadpool(self._zip, job)

    async def layers_psd(self, job_id: str, *, owner: str | None) -> bytes:
        """All layers of a finished job as one PSD, built on first download and kept;
        a 422 for layers wider or taller than a PSD holds."""
        job = await self.finished_job(job_id, owner=owner)
        width, height = job.result["width"], job.result["height"]
        if max(width, height) > exports.PSD_MAX_SIDE:
            raise ProblemError(422, "Too large for PSD",
                               f"the layers are {width}x{height}; a PSD holds at most {exports.PSD_MAX_SIDE} px "
                               "a side: download result.zip or result.pptx instead", slug="output-too-large-for-psd")
        return await run_in_threadpool(self._stored_export, job, "result.psd", self._psd)

    async def layers_pptx(self, job_id: str, *, owner: str | None) -> bytes:
        """All layers of a finished job as one PowerPoint slide, built on first download and kept."""
        job = await self.finished_job(job_id, owner=owner)
        return await run_in_threadpool(self._stored_export, job, "result.pptx", self._pptx)

    def _layer_pngs(self, job: Job) -> list[bytes]:
        return [self.jobs.storage.get(layer_key(job.id, entry["index"])) for entry in job.result["layers"]]

    def _zip(self, job: Job) -> bytes:
        manifest = json.loads(self.jobs.storage.get(manifest_key(job.id)))
        return exports.layers_zip(self._layer_pngs(job), manifest=manifest)

    def _psd(self, job: Job) -> bytes:
        layers = [imaging.decode_rgba_png(png) for png in self._layer_pngs(job)]
        return exports.layers_psd(layers, [entry["name"] for entry in job.result["layers"]])

    def _pptx(self, job: Job) -> bytes:
        names = [entry["name"] for entry in job.result["layers"]]
        return exports.layers_pptx(self._layer_pngs(job), names, job.result["width"], job.result["height"])

    def _stored_export(self, job: Job, filename: str, build: Callable[[Job], bytes]) -> bytes:
        storage = self.jobs.storage
        key = f"jobs/{job.id}/{filename}"
        if storage.exists(key):
            return storage.get(key)
        data = build(job)
        storage.put(key, data)
        return data


def current_service() -> StrataService:
    """The `StrataService` of this ingress replica."""
    return serve.get_replica_context().servable_object.service


async def _current_service() -> StrataService:
    # async: FastAPI runs a plain-function dependency in its thread pool, a thread hop
    # before every request's handler (docs/PERFORMANCE.md).
    return current_service()


CurrentService = Annotated[StrataService, Depends(_current_service)]
"""A route's parameter of this type receives the replica's `StrataService`."""
