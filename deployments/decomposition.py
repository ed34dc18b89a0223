"""The layer-decomposition deployment: one image per engine call, streamed progress.

A call is a streaming handle call (`handle.options(stream=True)`): it yields one
progress event per engine step, then the layers. Cancelling the call (the caller's
`response.cancel()`) makes the engine stop at its next step. Scale with replicas:
the Qwen pipeline must not batch several images in one call.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, model_validator
from ray import serve

from deployments.engine import DecompositionCancelled, LayerEngine, LayerParams
from deployments.loading import health_report, load_with_fallback
from deployments.metrics import ModelMetrics

class LayeredModelConfig(BaseModel):
    """One layer-decomposition model, as the config file's `args.layered.<name>`."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["qwen-image-layered", "classic"] = Field(
        "qwen-image-layered", description="qwen-image-layered (diffusers weights) or classic (palette, no weights)."
    )
    weights: str | None = Field(None, description="Hugging Face model id or local directory (qwen-image-layered).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    device: str = Field(
        "auto", description="auto (needs a GPU; never the 55 GB model on CPU by default), cpu, cuda or cuda:N."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto", description="auto: bfloat16 on GPU.")
    cpu_offload: bool = Field(False, description="Model CPU offload for 48 GB GPUs (slower).")
    attention_backend: str | None = Field(
        None, description="diffusers attention backend (native, flash, _flash_3, sage, ...); unset: torch SDPA."
    )
    first_block_cache_threshold: float | None = Field(
        None, gt=0, description="diffusers First Block Cache: skip the other transformer blocks when the first "
        "block's output changed less than this since the last step (0.05-0.1: faster, slightly different); unset: off.",
    )
    warmup: bool = Field(True, description="Run one 1-step decomposition at start so the first job does not pay start-up.")
    fallback: Literal["classic"] | None = Field(
        None, description="Serve this engine instead when the model cannot run here; unset: a startup error."
    )
    num_gpus: float = Field(0, ge=0, description="GPU share per replica; ignored on a cluster with no GPU.")
    num_cpus: float = Field(
        0.25, ge=0, description="CPU share per replica Ray reserves for scheduling (small, so all models fit a laptop)."
    )
    resources: dict[str, NonNegativeFloat] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. {gpu_node: 0.01}: replicas run only on nodes that offer them.",
    )

    @model_validator(mode="after")
    def _qwen_needs_weights(self) -> "LayeredModelConfig":
        if self.engine == "qwen-image-layered" and not self.weights:
            raise ValueError("the qwen-image-layered engine needs `weights` (a model id or a local directory)")
        return self


def layer_deployment_name(model: str) -> str:
    """The deployment of layer model `model`. Layer models may share a client-facing
    name with a segmentation model (`classic` does both), so they are named apart."""
    return f"layers-{model}"


def load_layer_engine(name: str, config: LayeredModelConfig) -> tuple[LayerEngine, str | None]:
    """Build and load the configured engine; returns it and why it fell back, if it did."""
    from deployments.classic import ClassicLayerEngine

    if config.engine == "classic":
        return load_with_fallback(name, None, ClassicLayerEngine, None)

    from deployments.qwen_layered import QwenLayeredEngine

    def build() -> LayerEngine:
        return QwenLayeredEngine(weights=config.weights, device=config.device, dtype=config.dtype,
                                 cpu_offload=config.cpu_offload, attention_backend=config.attention_backend,
                                 revision=config.revision,
                                 first_block_cache_threshold=config.first_block_cache_threshold,
                                 warmup=config.warmup)

    return load_with_fallback(name, config.weights, build, ClassicLayerEngine if config.fallback else None)


@serve.deployment(
    # One pipeline call per replica at a time; further calls wait in the queue.
    max_ongoing_requests=1,
    # Long jobs: let a running decomposition finish on scale-down or upgrade.
    graceful_shutdown_timeout_s=600,
)
class LayerDecompositionDeployment:
    """Serves one layer engine; `decompose` streams progress, then the layers."""

    def __init__(self, name: str, config: LayeredModelConfig):
        self._name = name
        self._config = config
        self._engine, self._fallback_reason = load_layer_engine(name, config)
        self._metrics = ModelMetrics(name, self._engine.info)
        self._in_flight = 0

    async def decompose(self, image: np.ndarray, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yields {"type": "progress", "step", "total", "at"} per step (``at``: when the
        engine finished the step, epoch seconds), then {"type": "layers", "layers":
        [HxWx4 uint8], "engine"}."""
        layer_params = LayerParams(**params)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def on_step(step: int, total: int) -> bool:
            event = {"type": "progress", "step": step, "total": total, "at": time.time()}
            loop.call_soon_threadsafe(events.put_nowait, event)
            return not stop.is_set()

        started = time.perf_counter()
        work = asyncio.ensure_future(asyncio.to_thread(self._engine.decompose, image, layer_params, on_step))
        self._in_flight += 1
        self._metrics.set_queue_depth(self._in_flight)
        work.add_done_callback(self._decomposition_ended)
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                break
            layers = work.result()  # raises DecompositionCancelled or the engine's error
            self._metrics.observe_call(time.perf_counter() - started)
            yield {"type": "layers", "layers": layers, "engine": self._engine.info.engine}
        finally:
            # The caller cancelled (or went away): the engine stops at its next step.
            stop.set()
            if not work.done():
                try:
                    await asyncio.shield(work)
                except (DecompositionCancelled, Exception):
                    pass

    def _decomposition_ended(self, _work: asyncio.Future) -> None:
        # The engine call's end, however the stream ended (a cancelled engine
        # runs on to its next step).
        self._in_flight -= 1
        self._metrics.set_queue_depth(self._in_flight)

    def health(self) -> dict[str, Any]:
        """What /v1/health reports for this replica."""
        return health_report(self._engine, self._config.weights, self._fallback_reason)
