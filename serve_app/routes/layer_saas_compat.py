"""image-layer-saas's API on Strata's layer jobs: point its frontend (or any
client of it) at Strata.

The contract is image-layer-saas's backend (https://github.com/sorinciupitu/image-layer-saas,
backend/main.py and backend/tasks.py, and its README's "API Documentation"):

- `POST /api/decompose`: multipart `image`, form fields `num_layers` (2-8,
  default 4), `inference_preset` (safe, balanced, quality, custom),
  `device_mode` (auto, cpu, cuda, balanced), and with `custom` also
  `resolution`, `num_inference_steps`, `true_cfg_scale`; `use_en_prompt`,
  `cfg_normalize`. With the header `X-Async-Only: true` (or 1, yes): 202
  `{"task_id", "status": "processing", "status_url", "download_url"}` (absolute
  URLs). Without it the request waits: 200 and the ZIP when the job ends in
  time, 500 `{"detail": error}` when it fails, the same 202 when it is still
  running.
- `GET /api/status/{task_id}`: `{"task_id", "status", "progress" (0-100),
  "message", "events", "state"}` with `status` pending or processing; done
  adds `download_url`, `layers` (`layer_01.png`, ...) and `layer_urls`; error
  adds `error`.
- `GET /api/download/{task_id}`: the ZIP (`layer_01.png`, ... bottom first).
- `GET /api/layer/{task_id}/{layer_name}`: one layer PNG; a name that is not a
  plain `*.png` file name is 400, an unknown one 404.
- `GET /api/health`: `{"status", "model": {"id", "device", "dtype",
  "loaded"}, "gpu": {"available", "name", "vram_used_mb", "vram_total_mb"}}`.
- Errors are FastAPI's `{"detail": ...}` (the project is a FastAPI app).

Every task is a Strata layer job (`/v1/jobs/{task_id}` is the same job) run by
the config's `default_layer_model`. How its parameters map (docs/COMPATIBILITY.md
says the same): the presets keep their steps and guidance (safe 16 / 2.5,
balanced 24 / 3.0, quality 32 / 3.5); Qwen-Image-Layered runs at its 640 or
1024 bucket only, so every preset runs at 640 and a custom `resolution` above
640 at 1024; `device_mode`, `use_en_prompt` and `cfg_normalize` are checked
and otherwise left to the config; the synchronous wait is `jobs.max_wait_s`.
An unknown task is 404 (image-layer-saas reports any unknown id as pending);
the ZIP also holds Strata's `manifest.json`.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app import exports
from serve_app.access import request_owner
from serve_app.jobs import Job, JobStatus
from serve_app.problems import ProblemError
from serve_app.routes.detail_errors import DETAIL_RESPONSES, DetailErrorRoute, missing_field, validation_error
from serve_app.schemas import LayersParams
from serve_app.service import CurrentService
from serve_app.uploads import read_form


class LayerSaasRoute(DetailErrorRoute):
    # image-layer-saas answers 400 for a file that is not an image it reads.
    remapped_statuses = {415: 400}


router = APIRouter(route_class=LayerSaasRoute, tags=["image-layer-saas compatible"], responses=DETAIL_RESPONSES)
# Tasks belong to the API key that created them, as Strata's jobs do (serve_app/access.py).
Owner = Annotated[str | None, Depends(request_owner)]

# inference_preset -> (num_inference_steps, true_cfg_scale), as image-layer-saas sets them.
PRESETS = {"safe": (16, 2.5), "balanced": (24, 3.0), "quality": (32, 3.5)}
DEVICE_MODES = ("auto", "cpu", "cuda", "balanced")
_TRUTHY = {"1", "true", "yes"}
_LAYER_FILE = re.compile(r"^layer_(\d{2,3})\.png$")


class DecomposeForm(BaseModel):
    """The form fields of `POST /api/decompose` (names and defaults as image-layer-saas declares them)."""

    model_config = ConfigDict(extra="ignore")

    num_layers: int = 4
    inference_preset: str = "balanced"
    device_mode: str = "auto"
    resolution: int = 512
    num_inference_steps: int = Field(24, ge=1, le=100)
    true_cfg_scale: float = Field(3.0, ge=1.0, le=20.0)
    use_en_prompt: bool = True
    cfg_normalize: bool = True

    def layers_params(self) -> LayersParams:
        """The Strata layer job this request asks for, or image-layer-saas's 422."""
        if not 2 <= self.num_layers <= 8:
            raise ProblemError(422, "Invalid parameters", "num_layers must be between 2 and 8")
        preset = self.inference_preset.strip().lower()
        if preset not in (*PRESETS, "custom"):
            raise ProblemError(422, "Invalid parameters",
                               "inference_preset must be one of: safe, balanced, quality, custom")
        if self.device_mode.strip().lower() not in DEVICE_MODES:
            raise ProblemError(422, "Invalid parameters", "device_mode must be one of: auto, cpu, cuda, balanced")
        if preset == "custom":
            steps, cfg = self.num_inference_steps, self.true_cfg_scale
            resolution = 1024 if self.resolution > 640 else 640
        else:
            (steps, cfg), resolution = PRESETS[preset], 640
        return LayersParams(layers=self.num_layers, resolution=resolution, steps=steps, true_cfg_scale=cfg)


def _url(request: Request, name: str, **params: str) -> str:
    return str(request.url_for(name, **params))


def _accepted(request: Request, job: Job) -> JSONResponse:
    return JSONResponse({
        "task_id": job.id,
        "status": "processing",
        "status_url": _url(request, "layer_saas_status", task_id=job.id),
        "download_url": _url(request, "layer_saas_download", task_id=job.id),
    }, status_code=202)


def _zip_response(data: bytes, filename: str) -> Response:
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.post(
    "/api/decompose",
    summary="image-layer-saas: decompose an image into layers",
    response_class=Response,
    responses={200: {"description": "The layers as a ZIP (when the job ends in time)",
                     "content": {"application/zip": {}}},
               202: {"description": "task_id, status, status_url, download_url"}},
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary"},
                       **{name: {"type": "string"} for name in DecomposeForm.model_fields}},
    }}}}},
)
async def decompose(request: Request, service: CurrentService, owner: Owner) -> Response:
    service.layer_model_name(None)  # a deployment without layer models says so before the upload
    form = await read_form(request, service.config.limits)
    upload = form.files.get("image")
    if upload is None:
        raise missing_field("image")
    try:
        fields = DecomposeForm.model_validate(form.fields)
    except ValidationError as exc:
        raise validation_error(exc, {name: "body" for name in form.fields}) from exc
    job = await service.submit_layer_job(upload.data, fields.layers_params(), owner=owner)
    if request.headers.get("x-async-only", "").strip().lower() in _TRUTHY:
        return _accepted(request, job)
    job = await service.wait_for_end(job, service.config.jobs.max_wait_s)
    if job.status == JobStatus.SUCCEEDED:
        stem = PurePosixPath(upload.filename or "").stem or "image"
        return _zip_response(await service.layers_zip(job.id, owner=owner), f"{stem}_layers.zip")
    if job.terminal:
        return JSONResponse({"detail": job.error or f"the task was {job.status.value}"}, status_code=500)
    return _accepted(request, job)


def _events(job: Job) -> list[str]:
    """The job's history in words, oldest first (image-layer-saas lists its worker's messages)."""
    events = [f"Queued at {job.created_at.isoformat()}"]
    if job.started_at:
        events.append(f"Started at {job.started_at.isoformat()} (attempt {job.attempts})")
    if job.step is not None and job.total_steps:
        events.append(f"Step {job.step}/{job.total_steps}")
    if job.finished_at:
        events.append(f"{job.status.value.capitalize()} at {job.finished_at.isoformat()}")
    return events


def status_body(job: Job, request: Request) -> dict[str, Any]:
    """`GET /api/status/{task_id}` for a job."""
    progress = max(0, min(100, int(job.progress * 100)))
    body: dict[str, Any] = {"task_id": job.id, "events": _events(job)}
    if job.status == JobStatus.SUCCEEDED:
        layers = [exports.layer_filename(layer["index"]) for layer in job.result["layers"]]
        return {**body, "status": "done", "progress": 100, "state": "SUCCESS",
                "download_url": _url(request, "layer_saas_download", task_id=job.id),
                "layers": layers,
                "layer_urls": [_url(request, "layer_saas_layer", task_id=job.id, layer_name=name) for name in layers]}
    if job.terminal:
        cancelled = job.status == JobStatus.CANCELLED
        return {**body, "status": "error", "progress": progress, "state": "REVOKED" if cancelled else "FAILURE",
                "message": "Cancelled" if cancelled else "Failed",
                "error": job.error or "the task was cancelled"}
    if job.status == JobStatus.RUNNING:
        message = f"Step {job.step}/{job.total_steps}" if job.step is not None and job.total_steps else "Running"
        return {**body, "status": "processing", "progress": progress, "message": message,
                "state": "PROGRESS" if job.step is not None else "STARTED"}
    return {**body, "status": "pending", "progress": 0, "message": "Queued", "state": "PENDING"}


@router.get("/api/status/{task_id}", name="layer_saas_status", summary="image-layer-saas: a task's state")
async def task_status(task_id: str, request: Request, service: CurrentService, owner: Owner) -> dict[str, Any]:
    return status_body(await service.job(task_id, owner=owner), request)


@router.get("/api/download/{task_id}", name="layer_saas_download", response_class=Response,
            summary="image-layer-saas: all layers as a ZIP",
            responses={200: {"content": {"application/zip": {}}}})
async def download(task_id: str, service: CurrentService, owner: Owner) -> Response:
    try:
        data = await service.layers_zip(task_id, owner=owner)
    except ProblemError as exc:
        if exc.status == 404:
            raise ProblemError(404, exc.title, "Result ZIP is not available for this task") from exc
        raise
    return _zip_response(data, f"{task_id}_layers.zip")


@router.get("/api/layer/{task_id}/{layer_name}", name="layer_saas_layer", response_class=Response,
            summary="image-layer-saas: one layer PNG", responses={200: {"content": {"image/png": {}}}})
async def layer(task_id: str, layer_name: str, service: CurrentService, owner: Owner) -> Response:
    if PurePosixPath(layer_name).name != layer_name or not layer_name.lower().endswith(".png"):
        raise ProblemError(400, "Invalid layer", "Invalid layer file name")
    match = _LAYER_FILE.match(layer_name)
    try:
        if match is None or int(match.group(1)) < 1:
            raise ProblemError(404, "Not found", "Layer file not found")
        data = await service.layer_png(task_id, int(match.group(1)), owner=owner)
    except ProblemError as exc:
        if exc.status == 404:
            raise ProblemError(404, exc.title, "Layer file not found") from exc
        raise
    return Response(data, media_type="image/png",
                    headers={"Content-Disposition": f'attachment; filename="{layer_name}"'})


def gpu_report(models: list[Any]) -> dict[str, Any]:
    """The GPU of the first model replica that reports one, in image-layer-saas's fields."""
    for model in models:
        memory = model.gpu_memory
        if memory:
            mib = 1024 * 1024
            return {"available": True, "name": model.gpu_name,
                    "vram_used_mb": round((memory["total_bytes"] - memory["free_bytes"]) / mib, 2),
                    "vram_total_mb": round(memory["total_bytes"] / mib, 2)}
    return {"available": False, "name": None, "vram_used_mb": 0, "vram_total_mb": 0}


@router.get("/api/health", summary="image-layer-saas: the layer model and the GPU")
async def health(service: CurrentService) -> dict[str, Any]:
    report = await service.health()
    name = service.config.default_layer_model
    layer_model = report.layer_models.get(name) if name else None
    model = None if layer_model is None else {
        "id": layer_model.weights or name,
        "device": layer_model.device,
        "dtype": layer_model.dtype,
        "loaded": layer_model.loaded,
        "engine": layer_model.engine,  # Strata's own: qwen-image-layered, or classic (a fallback says so)
    }
    candidates = [m for m in (layer_model, *report.layer_models.values(), *report.models.values()) if m]
    return {"status": report.status, "model": model, "gpu": gpu_report(candidates)}
