"""The HTTP contract: request parameters and response bodies (pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RemoveBackgroundParams(BaseModel):
    """Query parameters of `POST /v1/remove-background`."""

    model_config = ConfigDict(extra="forbid")

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
    replicas: dict[str, int] = Field(default_factory=dict, description="Replica count by state.")
    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = None
    gpu_memory: dict[str, int] | None = None
    last_error: str | None = None


class Health(BaseModel):
    """`GET /v1/health`."""

    status: Literal["ok", "degraded"]
    default_model: str
    models: dict[str, ModelHealth]


PROBLEM_RESPONSES = {
    status: {"model": Problem, "description": description, "content": {"application/problem+json": {}}}
    for status, description in {
        413: "Upload or image too large",
        415: "Not an image this service reads",
        422: "Invalid parameters or image",
        503: "Busy: retry after the Retry-After header's seconds",
    }.items()
}
