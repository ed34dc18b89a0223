"""The application's typed configuration: the `args` block of a Serve config file.

Each setting has one source: model settings live here (under `segmentation`),
serving settings (replicas, batching, queue bounds) in the config file's
`deployments` section, which Ray Serve applies to each deployment by name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, field_validator, model_validator

from deployments.decomposition import LayeredModelConfig
from deployments.segmentation import SegmentationModelConfig


class UploadLimits(BaseModel):
    """What the service accepts before any model runs."""

    model_config = ConfigDict(extra="forbid")

    max_upload_mb: float = Field(20, gt=0, description="Largest accepted upload, enforced while reading.")
    max_pixels: int = Field(40_000_000, gt=0, description="Largest accepted width x height, checked from the header before decoding.")
    min_side: int = Field(16, ge=1, description="Smallest accepted width or height.")
    upload_timeout_s: float = Field(
        30, gt=0, description="Longest wait for the next bytes of an upload; a client silent this long gets 408.",
    )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: str) -> str:
    """``value`` with each ``${VAR}`` replaced by that environment variable.

    ValueError naming the variable when it is unset or empty: a URL with a hole in
    it is never what was meant, and failing at start says so where a connection
    error later would not. Only the braced form is expanded (a ``$`` elsewhere,
    as in a password, is left alone).
    """

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        found = os.environ.get(name)
        if not found:
            raise ValueError(f"environment variable {name} is {'empty' if found == '' else 'not set'}")
        return found

    return _ENV_REFERENCE.sub(lookup, value)


class JobsConfig(BaseModel):
    """Durable layer jobs: where they live, how many wait, how long they stay."""

    model_config = ConfigDict(extra="forbid")

    data_dir: str = Field("data", description="Inputs and results (and the SQLite job store); relative to the working directory.")
    store_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store; unset: sqlite:///<data_dir>/jobs.db. PostgreSQL: postgresql+psycopg://... "
                          "`${VAR}` is read from the environment.",
    )
    results_url: str | None = Field(
        None, description="Where job inputs and results live: an fsspec URL (s3://bucket/prefix, gs://bucket/prefix, "
                          "file:///mnt/shared/strata) or a local path; unset: <data_dir>. `${VAR}` is read from the environment.",
    )
    max_queued: int = Field(20, ge=1, description="Queued jobs accepted at most; past this POST answers 503 with Retry-After.")
    max_running: int = Field(2, ge=1, description="Jobs one ingress replica dispatches to the models at once.")
    lease_s: float = Field(30, gt=0, description="A dispatch's lease; a job whose lease lapsed (its process died) is dispatched again.")
    max_attempts: int = Field(3, ge=1, description="Dispatches of one job before it fails (a job that kills its worker).")
    retention_h: float = Field(168, gt=0, description="Hours a finished job and its files are kept.")
    max_wait_s: float = Field(60, ge=0, description="Longest `Prefer: wait=N` honoured.")

    @field_validator("store_url", "results_url")
    @classmethod
    def _expand_env(cls, value: str | None) -> str | None:
        # Secrets (a database password) stay out of the config file and out of
        # the config Ray Serve stores and shows: the file says ${VAR}.
        return None if value is None else expand_env(value)

    @property
    def url(self) -> str:
        return self.store_url or f"sqlite:///{Path(self.data_dir).resolve() / 'jobs.db'}"


# rembg's model names (rembg/sessions/*.py `name()`) that Strata can answer, and the
# served model each maps to by default: every BiRefNet checkpoint rembg offers to
# the BiRefNet deployment, BRIA's RMBG to RMBG-2.0 (the same architecture).
DEFAULT_REMBG_MODELS = {
    "birefnet-general": "birefnet",
    "birefnet-general-lite": "birefnet",
    "birefnet-portrait": "birefnet",
    "birefnet-dis": "birefnet",
    "birefnet-hrsod": "birefnet",
    "birefnet-cod": "birefnet",
    "birefnet-massive": "birefnet",
    "bria-rmbg": "rmbg",
}


class CompatConfig(BaseModel):
    """The routes that answer other projects' APIs (rembg, remove.bg, image-layer-saas)."""

    model_config = ConfigDict(extra="forbid")

    rembg_models: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_REMBG_MODELS),
        description="rembg model name (`/api/remove?model=`) -> served segmentation model. "
                    "Left unset, names whose model is not served are simply unavailable; "
                    "set, every target must be served.",
    )


class UrlInputsConfig(BaseModel):
    """Images fetched from a URL the client names (`image_url`): the limits of that fetch."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Accept `image_url`; false: such requests answer 422.")
    max_bytes: int | None = Field(
        None, gt=0, description="Largest body fetched, enforced while reading (413); unset: the upload limit.",
    )
    timeout_s: float = Field(10, gt=0, description="Deadline of the whole fetch, redirects included (408).")
    max_redirects: int = Field(3, ge=0, le=20, description="Redirects followed at most, each hop vetted again.")
    allow_private_networks: bool = Field(
        False, description="Fetch from private, loopback and link-local addresses too. Tests and development only: "
                           "it lets any client make the service request its own network.",
    )


class AuthConfig(BaseModel):
    """API keys and rate limits (serve_app/access.py). No keys anywhere: the API is open."""

    model_config = ConfigDict(extra="forbid")

    api_keys_file: str | None = Field(
        None, description="A file of API keys, one per line, optionally `name:key`; `#` starts a comment. "
                          "Keys in the STRATA_API_KEYS environment variable (comma-separated) count too. "
                          "A source that is set but holds no key is a startup error.",
    )
    rate_limit: str | None = Field(
        None, description="Requests allowed per key (per client address when no keys are set), e.g. `60/minute`, "
                          "`1000/hour`, `10/second;100/minute`; counted per ingress replica. Unset: no limit.",
    )

    trusted_proxies: list[str] = Field(
        ["127.0.0.1", "::1"],
        description="Peer addresses whose X-Forwarded-For names the client, for per-address rate limits: the "
                    "proxy in front of the ingress (make run's HAProxy connects from loopback and sets the "
                    "header). Anyone else's X-Forwarded-For is ignored. On a cluster add the nodes' addresses.",
    )

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            from limits import parse_many

            try:
                parse_many(value)
            except ValueError as exc:
                raise ValueError(f"rate_limit {value!r} is not a rate such as '60/minute': {exc}") from None
        return value


class CorsConfig(BaseModel):
    """Which web pages on other origins may call the API from a browser (CORS). Default: none."""

    model_config = ConfigDict(extra="forbid")

    allow_origins: list[str] = Field(
        default_factory=list, description="Origins allowed, e.g. `https://app.example.com`; `*` allows any. Empty: CORS off.",
    )
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "POST", "DELETE"])
    allow_headers: list[str] = Field(
        default_factory=lambda: ["Authorization", "X-Api-Key", "Content-Type", "Prefer", "X-Request-ID"],
    )
    expose_headers: list[str] = Field(
        default_factory=lambda: ["Location", "Retry-After", "X-Request-ID", "X-Model", "X-Engine", "X-Engine-Warning", "X-Batch-Size",
                                 "X-Processing-Ms", "Server-Timing", "X-Width", "X-Height", "Preference-Applied",
                                 "Content-Disposition"],
        description="Response headers a page's script may read.",
    )
    allow_credentials: bool = Field(
        False, description="Let other origins' pages send cookies (they send keys in headers; "
                           "the key cookie is for Strata's own page). Not with `*` in allow_origins.")
    max_age_s: int = Field(600, ge=0, description="How long browsers may cache a preflight answer.")

    @model_validator(mode="after")
    def _no_credentials_for_any_origin(self) -> "CorsConfig":
        # Starlette answers a credentialed request from any origin by echoing that
        # origin: every site on the web could then call the API as the browser's user.
        if "*" in self.allow_origins and self.allow_credentials:
            raise ValueError("cors.allow_origins '*' cannot be combined with allow_credentials: true "
                             "(any site could call the API with the browser's cookies); list the origins instead")
        return self


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
    compat: CompatConfig = Field(default_factory=CompatConfig)
    url_inputs: UrlInputsConfig = Field(default_factory=UrlInputsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    cors: CorsConfig = Field(default_factory=CorsConfig)
    ingress_num_cpus: float = Field(
        0.5, ge=0, description="CPU share per ingress replica Ray reserves for scheduling."
    )
    ingress_resources: dict[str, NonNegativeFloat] = Field(
        default_factory=dict,
        description="Custom Ray resources per ingress replica, e.g. {cpu_node: 0.01}: it runs only on nodes that offer them.",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503 when a queue is full.")
    model_timeout_s: float = Field(120, gt=0, description="Longest wait for one model call before answering 503.")

    @property
    def url_max_bytes(self) -> int:
        """The largest image fetched from a URL."""
        return self.url_inputs.max_bytes or self.limits.max_upload_bytes

    @model_validator(mode="after")
    def _models_are_served(self) -> "AppConfig":
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
        if "rembg_models" in self.compat.model_fields_set:
            unserved = {name: model for name, model in self.compat.rembg_models.items()
                        if model not in self.segmentation}
            if unserved:
                raise ValueError(
                    f"compat.rembg_models maps {', '.join(f'{k!r} to {v!r}' for k, v in unserved.items())}, "
                    f"which is not a segmentation model ({', '.join(self.segmentation)})"
                )
        return self

    def rembg_models(self) -> dict[str, str]:
        """rembg model name -> served model, for the names whose model is served here."""
        return {name: model for name, model in self.compat.rembg_models.items() if model in self.segmentation}
