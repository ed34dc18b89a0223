"""Loading a model engine with its configured fallback, and reporting what runs.

Both deployments (segmentation, decomposition) load the same way: the configured
engine, or, when its weights cannot be had and the config names a fallback, the
classic engine, said so in a WARNING and in every health report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ray import serve

logger = logging.getLogger("ray.serve")
E = TypeVar("E")


def load_with_fallback(name: str, weights: str | None, build: Callable[[], E],
                       build_fallback: Callable[[], E] | None) -> tuple[E, str | None]:
    """The loaded engine `build()` makes, or `build_fallback()`'s when it cannot be
    built or loaded; returns it and the reason it fell back (None if it did not).
    Without a fallback that is a startup error naming the model and the reason.

    Every exception counts, not only missing weights: a model's own code can fail in
    any way (an AttributeError under another transformers, a dtype its kernels lack at
    warm-up), and a replica that let it escape would crash and be restarted forever."""
    try:
        engine = build()
        engine.load()
        return engine, None
    except Exception as exc:  # noqa: BLE001 - see the docstring
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {_message(exc)}"
        if build_fallback is None:
            raise RuntimeError(f"model {name!r} cannot be loaded: {reason}") from exc
        logger.warning("model %r serves the classic engine instead of %s: %s", name, weights, reason)
        fallback = build_fallback()
        fallback.load()
        return fallback, reason


def _message(exc: Exception, limit: int = 500) -> str:
    message = " ".join(str(exc).split()) or "(no message)"
    return message if len(message) <= limit else message[: limit - 3] + "..."


def health_report(engine: Any, weights: str | None, fallback_reason: str | None) -> dict[str, Any]:
    """What /v1/health shows of the engine a replica runs."""
    info = engine.info
    return {
        "replica": serve.get_replica_context().replica_id.unique_id,
        "engine": info.engine,
        "device": info.device,
        "dtype": info.dtype,
        "weights": weights if info.engine != "classic" else None,
        "loaded": True,
        "fallback_reason": fallback_reason,
        # What a weights-free engine is for, wherever it serves (configured or fallen back to).
        "engine_about": getattr(engine, "about", None),
        "gpu_memory": _gpu_memory(info.device),
        "gpu_name": _gpu_name(info.device),
    }


def _gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def _gpu_memory(device: str) -> dict[str, int] | None:
    if not device.startswith("cuda"):
        return None
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return {"allocated_bytes": torch.cuda.memory_allocated(device), "free_bytes": free, "total_bytes": total}
