"""The HTTP contract: request parameters and response bodies (pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ImageSourceParams(BaseModel):
    """Where a route's image comes from when it is not uploaded."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(
        None, max_length=2048,
        description="Fetch the image from this public http(s) URL instead of uploading it: send exactly one of "
                    "the multipart field `image` and `image_url`.",
    )


class RemoveBackgroundParams(ImageSourceParams):
    """Query parameters of `POST /v1/remove-background`."""

    model: str | None = Field(None, description="Model name as listed by /v1/health; default: the configured default.")
    output: Literal["cutout", "mask"] = Field("cutout", description="cutout: RGBA image; mask: 8-bit alpha mask.")
    format: Literal["png", "webp"] = Field("png", description="Output format (WebP is lossless).")
    bg_color: str | None = Field(
        None, pattern=r"^#?[0-9A-Fa-f]{6}$",
        description="Composite the cutout over this colour (#RRGGBB) instead of transparency.",
    )
    crop: bool = Field(False, description="Trim the output to the foreground's bounding box.")
    refine_foreground: bool = Field(True, description="Estimate foreground colours at soft edges (no background halo).")


class Problem(BaseModel):
    """An error (RFC 9457 problem details)."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str | None = None


class ModelHealth(BaseModel):
    """One model deployment as its replicas report it."""

    replica: str | None = Field(None, description="The replica that answered this report.")
    engine: str | None = Field(None, description="The engine actually serving: birefnet or classic.")
    device: str | None = None
    dtype: str | None = None
    weights: str | None = Field(None, description="Model id or directory the weights came from.")
    loaded: bool = False
    fallback_reason: str | None = Field(None, description="Why the classic engine serves instead of the configured one.")
    engine_about: str | None = Field(None, description="What a weights-free engine is made for, and not for.")
    real_models_setup: str | None = Field(None, description="Where a weights-free engine serves: how to serve "
                                                            "the real models instead (weights, HF_TOKEN, README).")
    replicas: dict[str, int] = Field(default_factory=dict, description="Replica count by state.")
    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = None
    gpu_memory: dict[str, int] | None = None
    gpu_name: str | None = Field(None, description="The GPU the replica runs on, where it runs on one.")
    last_error: str | None = None


class Health(BaseModel):
    """`GET /v1/health`."""

    status: Literal["ok", "degraded"]
    default_model: str
    models: dict[str, ModelHealth] = Field(description="Background-removal models.")
    default_layer_model: str | None
    layer_models: dict[str, ModelHealth] = Field(description="Layer-decomposition models.")


class Session(BaseModel):
    """`/v1/session`: whether this service needs a key, and whose key the caller used."""

    keys_required: bool = Field(description="Whether every API request needs a key.")
    key_id: str | None = Field(description="The caller's key id (`name:<name>` or `key:<digest>`, never "
                                           "the key); null when the API is open.")


ERROR_STATUSES = {
    400: "Empty, truncated or corrupt image, or a malformed multipart body",
    404: "No such job or file",
    408: "The upload stalled (no bytes for the upload timeout), or fetching `image_url` timed out",
    413: "Upload, fetched image or image too large",
    415: "Not an image this service reads",
    422: "Invalid parameters or image",
    503: "Busy: retry after the Retry-After header's seconds",
}


def error_responses(media_type: str, schema: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The OpenAPI `responses` of the error statuses, each a `media_type` body of `schema`."""
    return {status: {"description": description, "content": {media_type: {"schema": schema}}}
            for status, description in ERROR_STATUSES.items()}


# Strata's own errors are application/problem+json only: declare that media type, with its schema.
PROBLEM_RESPONSES = error_responses("application/problem+json", Problem.model_json_schema())


class LayersParams(ImageSourceParams):
    """Query parameters of `POST /v1/layers`."""

    model: str | None = Field(None, description="Layer model name as listed by /v1/health; default: the configured default.")
    layers: int = Field(4, ge=2, le=10, description="Number of layers (background first).")
    resolution: int = Field(640, description="Working resolution bucket: 640 (recommended) or 1024.")
    steps: int = Field(50, ge=1, le=100, description="Diffusion steps (num_inference_steps).")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Random seed for reproducible layers.")
    prompt: str | None = Field(None, max_length=2000, description="Describe the image; empty: the model captions it.")
    true_cfg_scale: float = Field(4.0, ge=1.0, le=20.0, description="Classifier-free guidance scale (active above 1).")

    @field_validator("resolution")
    @classmethod
    def _bucket(cls, value: int) -> int:
        if value not in (640, 1024):
            raise ValueError("resolution must be 640 or 1024")
        return value


class LayerView(BaseModel):
    index: int = Field(description="1 = bottom (background).")
    name: str
    file: str
    url: str
    width: int
    height: int
    bbox: list[int] | None = Field(description="[x, y, width, height] of the layer's content; null when empty.")


class JobResult(BaseModel):
    engine: str
    model: str
    width: int
    height: int
    layers: list[LayerView]
    zip_url: str
    psd_url: str
    pptx_url: str | None = Field(None, description="Absent on jobs finished before PPTX export existed.")
    manifest_url: str
    timings: dict[str, float]
    warning: str | None = Field(None, description="Why the layers are likely poor, when the service can tell.")


class JobView(BaseModel):
    """A layer job (`GET /v1/jobs/{id}`)."""

    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float = Field(description="0..1")
    step: int | None
    total_steps: int | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    params: dict[str, Any]
    error: str | None
    result: JobResult | None
    warning: str | None = Field(None, description="Why the result is likely poor (e.g. fewer layers with content "
                                                   "than asked for), when the service can tell; null when all is well.")
    attempts: int
    cancel_requested: bool


class JobList(BaseModel):
    """`GET /v1/jobs`: newest first."""

    jobs: list[JobView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")
