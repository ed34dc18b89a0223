"""rembg's HTTP server API on Strata: point a rembg client at Strata's address.

The contract is that of `rembg s` (https://github.com/danielgatis/rembg,
rembg/commands/s_command.py and rembg/bg.py `remove`):

- `POST /api/remove`: multipart field `file`; parameters `model`, `a`, `af`,
  `ab`, `ae`, `om`, `ppm` as form fields (or query parameters), `bgc` and
  `extras` as query parameters (or form fields).
- `GET /api/remove?url=...`: the same for an image at a URL.
- 200: a PNG, always (rembg saves every result as PNG): the RGBA cutout; with
  `om=true` the 8-bit mask ("L"); with `bgc=r,g,b,a` the cutout laid over that
  colour, still RGBA.
- Errors are FastAPI's `{"detail": ...}` (rembg's server is a FastAPI app):
  422 with the list of invalid parameters, 400 for a model not served here
  (listing those that are) or an unreadable image, 413 and 415 as elsewhere.

How the parameters map to Strata (docs/COMPATIBILITY.md says the same):

- `model`: a rembg name maps to a served model through `compat.rembg_models`
  (BiRefNet checkpoints to BiRefNet, `bria-rmbg` to RMBG-2.0); Strata's own
  model names are accepted too; none means the config's `default_model` (rembg
  itself defaults to u2net, which Strata does not serve).
- `a` (alpha matting) turns on Strata's foreground colour estimation
  (`refine_foreground`): BiRefNet's mask is already soft, so Strata does not
  re-estimate alpha from a trimap; `af`, `ab`, `ae` are checked against rembg's
  ranges and have no further effect. Without `a`, the cutout is the input's
  colours under the mask, as rembg's default "naive cutout".
- `om`, `ppm`, `bgc` behave as in rembg (`ppm` is rembg's own post-processing).
- `extras` (JSON for rembg's sessions: SAM prompts, custom model paths) is
  accepted and ignored; rembg ignores it too when it is not valid JSON.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app import imaging
from serve_app.problems import ProblemError
from serve_app.routes.detail_errors import DETAIL_RESPONSES, DetailErrorRoute, missing_field, validation_error
from serve_app.service import CurrentService, Matte, StrataService, engine_headers
from serve_app.uploads import read_form

router = APIRouter(route_class=DetailErrorRoute, tags=["rembg compatible"], responses=DETAIL_RESPONSES)


class RembgParams(BaseModel):
    """rembg's `CommonQueryParams` (names, defaults and ranges as rembg declares them)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="rembg model name (or a Strata model name)")
    a: bool = Field(False, description="Alpha matting: Strata's foreground colour estimation")
    af: int = Field(240, ge=0, le=255, description="Alpha matting foreground threshold (no effect)")
    ab: int = Field(10, ge=0, le=255, description="Alpha matting background threshold (no effect)")
    ae: int = Field(10, ge=0, description="Alpha matting erode size (no effect)")
    om: bool = Field(False, description="Only mask")
    ppm: bool = Field(False, description="Post-process the mask (rembg's own)")
    bgc: tuple[int, int, int, int] | tuple[int, int, int] | None = Field(
        None, description="Background colour r,g,b,a (0-255 each)")
    extras: str | None = Field(None, description="rembg session parameters as JSON (ignored)")

    @field_validator("bgc", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",")]
            if len(parts) not in (3, 4) or not all(part.isdigit() and int(part) <= 255 for part in parts):
                raise ValueError("bgc must be r,g,b,a: three or four integers 0-255, e.g. 255,255,255,255")
            return tuple(int(part) for part in parts)
        return value


def _params(request: Request, form_fields: dict[str, str] | None = None) -> RembgParams:
    """Parameters from the query string, overridden by form fields (as rembg reads a POST)."""
    values = {**request.query_params, **(form_fields or {})}
    try:
        return RembgParams.model_validate(values)
    except ValidationError as exc:
        raise validation_error(exc, {name: "body" for name in form_fields or {}}) from exc


def _served_model(service: StrataService, name: str | None) -> str:
    """The served model a rembg `model` name stands for, or a 400 naming those there are."""
    if name is None:
        return service.config.default_model
    rembg_names = service.config.rembg_models()
    if name in rembg_names:
        return rembg_names[name]
    if name in service.segmenters:
        return name
    raise ProblemError(400, "Unknown model",
                       f"model {name!r} is not served here; rembg models served: "
                       f"{', '.join(rembg_names) or 'none'}; Strata models: {', '.join(service.segmenters)}",
                       slug="unknown-model")


def _render(matte: Matte, params: RembgParams) -> bytes:
    """rembg's `remove` on Strata's matte: mask post-processing, then mask or cutout, as PNG."""
    alpha = imaging.post_process_mask(matte.alpha) if params.ppm else matte.alpha
    if params.om:
        return imaging.encode_png(alpha)
    pixels = imaging.cutout_pixels(matte.image, alpha, bg_color=_rgba(params.bgc), refine_foreground=params.a)
    return imaging.encode_png(pixels)


def _rgba(bgc: tuple[int, ...] | None) -> tuple[int, int, int, int] | None:
    # rembg pastes the cutout on an RGBA canvas of this colour: the result stays RGBA.
    if bgc is None:
        return None
    return (*bgc[:3], bgc[3] if len(bgc) == 4 else 255)


async def _remove(service: StrataService, data: bytes, params: RembgParams, model: str) -> Response:
    with service.cpu_steps.request():
        matte = await service.matte(data, model)
        png = await service.cpu_steps.run(matte.pixels, _render, matte, params)
    service.request_metrics.observe("/api/remove", matte.model, matte.elapsed_ms() / 1000)
    return Response(png, media_type="image/png", headers=engine_headers(matte))


_PNG = {200: {"description": "The cutout (RGBA) or mask (with om=true), as PNG", "content": {"image/png": {}}}}


@router.post(
    "/api/remove",
    summary="rembg: remove the background of an uploaded image",
    response_class=Response,
    responses=_PNG,
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       **{name: {"type": "string"} for name in ("model", "a", "af", "ab", "ae", "om", "ppm")}},
    }}}}},
)
async def remove_uploaded(request: Request, service: CurrentService) -> Response:
    # A model named in the query is checked before the upload is read: a bad name costs no transfer.
    if "model" in request.query_params:
        _served_model(service, request.query_params["model"])
    form = await read_form(request, service.config.limits)
    upload = form.files.get("file")
    if upload is None:
        raise missing_field("file")
    params = _params(request, form.fields)
    return await _remove(service, upload.data, params, _served_model(service, params.model))


@router.get(
    "/api/remove",
    summary="rembg: remove the background of the image at a URL",
    response_class=Response,
    responses=_PNG,
)
async def remove_from_url(request: Request, service: CurrentService,
                          url: Annotated[str, Query(description="URL of the image that has to be processed.")],
                          ) -> Response:
    params = _params(request)
    model = _served_model(service, params.model)
    # Fetched from public addresses only, within the url_inputs limits (serve_app/url_inputs.py).
    data = await service.fetch_image_url(url)
    return await _remove(service, data, params, model)
