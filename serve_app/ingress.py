"""The ingress deployment: FastAPI routes that validate, call a model, encode.

It owns HTTP and the CPU-side image work (decode, resize, composite, encode), so
model replicas receive model-sized uint8 arrays. It never imports torch.
"""


import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from deployments.engine import EngineInfo
from serve_app import imaging
from serve_app.config import AppConfig
from serve_app.problems import ProblemError, install_problem_handlers
from serve_app.schemas import PROBLEM_RESPONSES, Health, ModelHealth, RemoveBackgroundParams
from serve_app.uploads import read_upload

app = FastAPI(
    title="Strata",
    version="1",
    summary="Background removal and layer decomposition, self-hosted on Ray Serve.",
)
install_problem_handlers(app)

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

    def __init__(self, config: AppConfig, segmenters: dict[str, DeploymentHandle]):
        self._config = config
        self._segmenters = segmenters
        self._limits = imaging.ImageLimits(max_pixels=config.limits.max_pixels, min_side=config.limits.min_side)
        self._engine_infos: dict[str, EngineInfo] = {}

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
        full_mask = await run_in_threadpool(imaging.resize_mask, mask, (image.width, image.height))
        rendered = await run_in_threadpool(
            imaging.render_cutout, image, full_mask, output=params.output, format=params.format,
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
        answers = await asyncio.gather(*(self._model_health(name) for name in self._segmenters),
                                       return_exceptions=False)
        models = {}
        for name, model_health in zip(self._segmenters, answers):
            model_health.replicas = replicas.get(name, {})
            models[name] = model_health
        status = "ok" if all(m.loaded for m in models.values()) else "degraded"
        return Health(status=status, default_model=self._config.default_model, models=models)

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
        model_input = await run_in_threadpool(imaging.resize_image, rgb, size)
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

    async def _model_health(self, name: str) -> ModelHealth:
        try:
            report = await asyncio.wait_for(_await(self._segmenters[name].health.remote()), 10)
        except Exception as exc:  # a model that cannot answer is reported, not raised
            return ModelHealth(loaded=False, last_error=f"{type(exc).__name__}: {exc}")
        return ModelHealth(**report)

