"""The application's typed configuration: the `args` block of a Serve config file.

Each setting has one source: model settings live here (under `segmentation`),
serving settings (replicas, batching, queue bounds) in the config file's
`deployments` section, which Ray Serve applies to each deployment by name.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, model_validator

from deployments.decomposition import LayeredModelConfig
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


class JobsConfig(BaseModel):
    """Durable layer jobs: where they live, how many wait, how long they stay."""

    model_config = ConfigDict(extra="forbid")

    data_dir: str = Field("data", description="Inputs and results (and the SQLite job store); relative to the working directory.")
    store_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store; unset: sqlite:///<data_dir>/jobs.db. PostgreSQL: postgresql+psycopg://...",
    )
    max_queued: int = Field(20, ge=1, description="Queued jobs accepted at most; past this POST answers 503 with Retry-After.")
    max_running: int = Field(2, ge=1, description="Jobs one ingress replica dispatches to the models at once.")
    lease_s: float = Field(30, gt=0, description="A dispatch's lease; a job whose lease lapsed (its process died) is dispatched again.")
    max_attempts: int = Field(3, ge=1, description="Dispatches of one job before it fails (a job that kills its worker).")
    retention_h: float = Field(168, gt=0, description="Hours a finished job and its files are kept.")
    max_wait_s: float = Field(60, ge=0, description="Longest `Prefer: wait=N` honoured.")

    @property
    def url(self) -> str:
        return self.store_url or f"sqlite:///{Path(self.data_dir).resolve() / 'jobs.db'}"


class AppConfig(BaseModel):
    """Everything `serve_app.app:build_app` reads from the config file's `args`."""

    model_config = ConfigDict(extra="forbid")

    segmentation: dict[str, SegmentationModelConfig] = Field(
        description="Background-removal models by the name clients use (`?model=`); each becomes a deployment of that name.",
    )
    default_model: str = Field(description="The model used when a request names none.")
    layered: dict[str, LayeredModelConfig] = Field(
        default_factory=dict,
        description="Layer-decomposition models by the name clients use (`?model=`); each becomes a deployment named `layers-<name>`.",
    )
    default_layer_model: str | None = Field(None, description="The layer model used when a job names none.")
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    limits: UploadLimits = Field(default_factory=UploadLimits)
    ingress_num_cpus: float = Field(
        0.5, ge=0, description="CPU share per ingress replica Ray reserves for scheduling."
    )
    ingress_resources: dict[str, NonNegativeFloat] = Field(
        default_factory=dict,
        description="Custom Ray resources per ingress replica, e.g. {cpu_node: 0.01}: it runs only on nodes that offer them.",
    )
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
        if self.layered and self.default_layer_model not in self.layered:
            raise ValueError(
                f"default_layer_model {self.default_layer_model!r} is not one of the layered models "
                f"({', '.join(self.layered)})"
            )
        return self
