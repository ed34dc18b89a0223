"""The background-removal deployment: one class serving any segmentation engine.

The configs deploy it once per model (BiRefNet, RMBG-2.0, classic). Requests are
grouped into batches by `@serve.batch`; the batch size and wait come from the
deployment's `user_config`, so they change at run time without a restart.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, model_validator
from ray import serve

from deployments.engine import EngineInfo, SegmentationEngine
from deployments.loading import health_report, load_with_fallback
from deployments.metrics import ModelMetrics

class SegmentationModelConfig(BaseModel):
    """One background-removal model, as the config file's `args.segmentation.<name>`."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["birefnet", "classic"] = Field(
        "birefnet", description="birefnet: BiRefNet-family weights (BiRefNet, RMBG-2.0); classic: no weights."
    )
    weights: str | None = Field(None, description="Hugging Face model id or local directory (birefnet engine).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    family: Literal["birefnet", "rmbg-2.0"] | None = Field(
        None, description="Whose code the weights run (it decides the precisions that work); unset: rmbg-2.0 "
                          "when `weights` names RMBG, else birefnet."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16", "autocast"] = Field(
        "auto", description="auto: birefnet float16, rmbg-2.0 autocast on a GPU; float32 on the CPU. autocast: float32 "
                            "weights, the forward under torch.autocast. A dtype the family cannot run is refused."
    )
    input_size: int = Field(1024, ge=32, description="Square side the model runs at (BiRefNet: 1024; BiRefNet_HR: 2048).")
    dynamic_size: bool = Field(
        False, description="BiRefNet_dynamic: each image at its own aspect, longer side <= input_size, sides multiples of 32."
    )
    channels_last: bool = Field(False, description="NHWC weights and input (faster convolutions on tensor-core GPUs).")
    compile: bool = Field(False, description="torch.compile the model (compiled during the warm-up at start).")
    pin_memory: bool = Field(True, description="CUDA: stage batches in reused page-locked buffers, copy non-blocking.")
    warmup: bool = Field(True, description="Run the model at start so the first request does not pay for initialisation.")
    fallback: Literal["classic"] | None = Field(
        None, description="Serve this engine instead when the weights cannot be had; unset: a startup error."
    )
    num_gpus: float = Field(
        0, ge=0, description="GPU share per replica (fractions pack replicas on one GPU); ignored on a cluster with no GPU."
    )
    num_cpus: float = Field(
        0.25, ge=0, description="CPU share per replica Ray reserves for scheduling (small, so all models fit a laptop)."
    )
    resources: dict[str, NonNegativeFloat] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. {gpu_node: 0.01}: replicas run only on nodes that offer them.",
    )

    @model_validator(mode="after")
    def _birefnet_needs_weights(self) -> "SegmentationModelConfig":
        if self.engine == "birefnet" and not self.weights:
            raise ValueError("the birefnet engine needs `weights` (a model id or a local directory)")
        if self.engine == "birefnet":
            from deployments.birefnet import family_of, refused_dtype

            family = self.family or family_of(self.weights)
            if refused := refused_dtype(family, self.dtype):
                raise ValueError(f"dtype {self.dtype} does not run {self.weights} ({family}): {refused}")
        return self


class BatchingConfig(BaseModel):
    """The deployment's `user_config`: dynamic batching, changeable at run time."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, description="Most requests one model call takes.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="Longest wait for a batch to fill once its first request arrived."
    )


@dataclass
class Segmentation:
    """One request's answer: its mask and how it was made."""

    mask: np.ndarray
    engine: str
    batch_size: int
    engine_ms: float  # the engine call that made it: its whole batch
    warning: str | None = None  # the engine's word that this mask is likely poor


@dataclass(eq=False)
class _Waiting:
    """One request on its way into a batch (hashable by identity, for the queue count)."""

    image: np.ndarray = field(repr=False)


def load_engine(name: str, config: SegmentationModelConfig) -> tuple[SegmentationEngine, str | None]:
    """Build and load the configured engine; returns it and why it fell back, if it did."""
    from deployments.classic import ClassicCutoutEngine

    if config.engine == "classic":
        return load_with_fallback(name, None, ClassicCutoutEngine, None)

    from deployments.birefnet import BiRefNetEngine

    def build() -> SegmentationEngine:
        return BiRefNetEngine(weights=config.weights, device=config.device, dtype=config.dtype,
                              input_size=config.input_size, revision=config.revision, family=config.family,
                              dynamic_size=config.dynamic_size, channels_last=config.channels_last,
                              compile=config.compile, pin_memory=config.pin_memory, warmup=config.warmup)

    return load_with_fallback(name, config.weights, build, ClassicCutoutEngine if config.fallback else None)


@serve.deployment(
    # Large enough for batches to fill, and for load to queue here rather than in the
    # caller's router (which retries a full replica with back-off of up to 0.5 s).
    max_ongoing_requests=64,
    user_config=BatchingConfig().model_dump(),
)
class SegmentationDeployment:
    """Serves one segmentation engine with dynamic batching."""

    def __init__(self, name: str, config: SegmentationModelConfig):
        self._name = name
        self._config = config
        self._engine, self._fallback_reason = load_engine(name, config)
        self._batching = BatchingConfig()
        self._metrics = ModelMetrics(name, self._engine.info)
        self._waiting: set[_Waiting] = set()
        self._in_flight = 0  # requests in this replica (all on its one event loop)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new `user_config` (batch size and wait) without restarting."""
        self._batching = BatchingConfig.model_validate(user_config or {})
        self._segment_batch.set_max_batch_size(self._batching.max_batch_size)
        self._segment_batch.set_batch_wait_timeout_s(self._batching.batch_wait_timeout_s)

    def info(self) -> EngineInfo:
        """The engine's input wishes, so the caller resizes once, on its side."""
        return self._engine.info

    async def segment(self, image: np.ndarray) -> Segmentation:
        """The mask of one RGB uint8 image at the size sent.

        A request that finds the replica idle runs at once, as a batch of one: waiting
        `batch_wait_timeout_s` for company would only add latency at low load. Requests
        that arrive while others are in the replica are batched.
        """
        waiting = _Waiting(image)
        self._waiting.add(waiting)
        self._report_waiting()
        self._in_flight += 1
        try:
            if self._in_flight == 1:
                (result,) = await self._predict([waiting])
                return result
            return await self._segment_batch(waiting)
        finally:  # also when the caller gave up before its batch started
            self._in_flight -= 1
            self._waiting.discard(waiting)
            self._report_waiting()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _segment_batch(self, requests: list[_Waiting]) -> list[Segmentation]:
        return await self._predict(requests)

    async def _predict(self, requests: list[_Waiting]) -> list[Segmentation]:
        """Masks for the requests of one batch: one engine call."""
        self._waiting.difference_update(requests)
        self._report_waiting()
        self._metrics.observe_batch(len(requests))
        started = time.perf_counter()
        # The engine call blocks; a thread keeps this replica's loop free to queue
        # the next batch meanwhile.
        results = await asyncio.to_thread(self._engine.predict_with_warnings, [request.image for request in requests])
        seconds = time.perf_counter() - started
        self._metrics.observe_call(seconds)
        return [Segmentation(mask, self._engine.info.engine, len(requests), seconds * 1000, warning)
                for mask, warning in results]

    def _report_waiting(self) -> None:
        self._metrics.set_queue_depth(len(self._waiting))

    def health(self) -> dict[str, Any]:
        """What /v1/health reports for this replica."""
        return {
            **health_report(self._engine, self._config.weights, self._fallback_reason),
            "max_batch_size": self._batching.max_batch_size,
            "batch_wait_timeout_s": self._batching.batch_wait_timeout_s,
        }
