"""The application's typed configuration: the `args` block of a Serve config file.

Each setting has one source: model settings live here (under `segmentation`),
serving settings (replicas, batching, queue bounds) in the config file's
`deployments` section, which Ray Serve applies to each deployment by name.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.segmentation import SegmentationModelConfig


class UploadLimits(BaseModel):
    """What the service accepts before any model runs."""

    model_config = ConfigDict(extra="forbid")

    max_upload_mb: float = Field(20, gt=0, description="Largest accepted upload, enforced while reading.")
    max_pixels: int = Field(40_000_000, gt=0, description="Largest accepted width x height, checked from the header before decoding.")
    min_side: int = Field(16, ge=1, description="Smallest accepted width or height.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class AppConfig(BaseModel):
    """Everything `serve_app.app:build_app` reads from the config file's `args`."""

    model_config = ConfigDict(extra="forbid")

    segmentation: dict[str, SegmentationModelConfig] = Field(
        description="Background-removal models by the name clients use (`?model=`); each becomes a deployment of that name.",
    )
    default_model: str = Field(description="The model used when a request names none.")
    limits: UploadLimits = Field(default_factory=UploadLimits)
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503 when a queue is full.")
    model_timeout_s: float = Field(120, gt=0, description="Longest wait for one model call before answering 503.")

    @model_validator(mode="after")
    def _default_model_is_served(self) -> "AppConfig":
        if not self.segmentation:
            raise ValueError("segmentation must name at least one model")
        if self.default_model not in self.segmentation:
            raise ValueError(
                f"default_model {self.default_model!r} is not one of the segmentation models "
                f"({', '.join(self.segmentation)})"
            )
        return self
