"""Where the ingress runs an image request's CPU steps (decode, resize, render).

In Starlette's thread pool as a rule, so the event loop keeps serving other requests
meanwhile and the steps of concurrent requests can use other cores. But a hop into the
pool and back costs ~0.5 ms on a busy two-core machine (docs/PERFORMANCE.md), twice or
more per request, and frees the loop for nobody when no other image request is in
flight. Then a small image's step (a few ms at most) runs on the loop itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")

# Steps on images up to this many pixels (one 1024x1024 image) may run on the event
# loop: decoding or encoding one takes a few ms here.
INLINE_MAX_PIXELS = 1 << 20


class CpuSteps:
    """Runs the CPU steps of image requests: on the event loop when one request has it to
    itself and the image is small, in the thread pool otherwise."""

    def __init__(self, inline_max_pixels: int = INLINE_MAX_PIXELS):
        self._inline_max_pixels = inline_max_pixels
        self._requests = 0  # image requests in flight (all on this one event loop)

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count an image request as in flight while the block runs (its steps run within it)."""
        self._requests += 1
        try:
            yield
        finally:
            self._requests -= 1

    async def run(self, pixels: int, step: Callable[..., T], *args, **kwargs) -> T:
        """``step(*args, **kwargs)`` for an image of ``pixels`` pixels, where it costs least."""
        if self._requests <= 1 and pixels <= self._inline_max_pixels:
            return step(*args, **kwargs)
        return await run_in_threadpool(step, *args, **kwargs)
