"""Strata's own Prometheus metrics, reported through Ray Serve.

Ray exports them on each node's metrics endpoint (`ray start --metrics-export-port`,
scraped by Prometheus) with a `ray_` prefix: `ray_strata_model_latency_seconds`,
`ray_strata_request_latency_seconds`, `ray_strata_batch_size`, `ray_strata_queue_depth`,
`ray_strata_jobs`, `ray_strata_engine`. Built inside a replica, each also carries
Serve's `application`, `deployment` and `replica` labels, so replicas of one model
stay separate series (a model name such as `classic` may name a segmentation and a
layer model: the `deployment` label tells them apart).

Ray keeps a histogram's bucket counts and `_count` exact; its `_sum` is estimated
from bucket midpoints (Ray 2.60 pre-aggregates histograms in each worker), so read
latencies from the buckets (`histogram_quantile`), not from `_sum / _count`.

Both sides import this module: the model deployments and the ingress, which must
not import torch, so it imports nothing but Ray.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from ray.serve.metrics import Gauge, Histogram

from deployments.engine import EngineInfo

# From a GPU segmentation call (~20 ms) to a CPU layer decomposition (minutes).
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
# One bucket per size up to 4, then steps of about 1.5x up to the largest sensible batch.
BATCH_SIZE_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
# Ray exports a gauge value at the first report after it was set, and only then;
# its endpoint drops a value not reported for two report intervals (Ray's default
# interval is 10 s, never under 1 s). So held gauge values are set again this
# often until they change, as Serve does with its own gauges.
GAUGE_REFRESH_S = 1.0


class HeldGauges:
    """Gauge values set again every GAUGE_REFRESH_S (by one daemon thread) until set anew."""

    def __init__(self) -> None:
        self._values: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Gauge, float, dict[str, str]]] = {}
        # Held while setting, so a refresh never sets a value older than the last one.
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def set(self, gauge: Gauge, value: float, tags: dict[str, str]) -> None:
        """Set `gauge` to `value` for these tags now, and again every GAUGE_REFRESH_S."""
        with self._lock:
            gauge.set(value, tags=tags)
            self._values[(id(gauge), tuple(sorted(tags.items())))] = (gauge, value, tags)
            if self._thread is None:
                self._thread = threading.Thread(target=self._refresh, name="strata-gauges", daemon=True)
                self._thread.start()

    def _refresh(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with self._lock:
                for gauge, value, tags in self._values.values():
                    gauge.set(value, tags=tags)


_held = HeldGauges()


class ModelMetrics:
    """What one model replica reports: call latency, batch sizes, its queue, its engine."""

    def __init__(self, model: str, info: EngineInfo):
        self._latency = Histogram(
            "strata_model_latency_seconds",
            description="Seconds one model call took (one batch, or one layer decomposition).",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("model", "engine"),
        )
        self._latency.set_default_tags({"model": model, "engine": info.engine})
        self._batch_size = Histogram(
            "strata_batch_size", description="Images per segmentation model call.",
            boundaries=BATCH_SIZE_BUCKETS, tag_keys=("model",),
        )
        self._batch_size.set_default_tags({"model": model})
        self._queue_depth = Gauge(
            "strata_queue_depth",
            description="Requests waiting on this replica for a batch (segmentation), "
                        "or jobs in flight on it (layer models).",
            tag_keys=("model",),
        )
        self._queue_depth.set_default_tags({"model": model})
        _held.set(self._queue_depth, 0, {})
        engine = Gauge(
            "strata_engine",
            description="1 for the engine a replica actually runs (after any fallback) and its device.",
            tag_keys=("model", "engine", "device"),
        )
        _held.set(engine, 1, {"model": model, "engine": info.engine, "device": info.device})

    def observe_call(self, seconds: float) -> None:
        """One model call finished after `seconds`."""
        self._latency.observe(seconds)

    def observe_batch(self, size: int) -> None:
        """A segmentation call took `size` images."""
        self._batch_size.observe(size)

    def set_queue_depth(self, depth: int) -> None:
        """Requests now waiting (segmentation) or jobs now in flight (layer models)."""
        _held.set(self._queue_depth, depth, {})


class RequestMetrics:
    """What the ingress reports per HTTP request."""

    def __init__(self) -> None:
        self._latency = Histogram(
            "strata_request_latency_seconds",
            description="Seconds the ingress took for a successful background removal (decode, model, encode).",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("route", "model"),
        )

    def observe(self, route: str, model: str, seconds: float) -> None:
        """A request to `route` for `model` was answered after `seconds`."""
        self._latency.observe(seconds, tags={"route": route, "model": model})


class JobMetrics:
    """Job counts by state, as the job store has them. Every ingress replica reports
    the same shared store: aggregate over replicas with max, not sum."""

    def __init__(self) -> None:
        self._jobs = Gauge("strata_jobs", description="Jobs in the job store by state.", tag_keys=("status",))

    def report(self, counts: Mapping[str, int]) -> None:
        """Set the gauge to these counts per state."""
        for status, count in counts.items():
            _held.set(self._jobs, count, {"status": status})
