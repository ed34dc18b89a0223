"""serve_app.cpu_steps: where the ingress runs an image request's CPU steps.

On the event loop's own thread when one small image request has the loop to itself;
in the thread pool when other image requests are in flight or the image is large.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve_app.cpu_steps import CpuSteps

SMALL, LARGE = 512 * 512, 4000 * 3000


def thread_of_step(steps: CpuSteps, pixels: int, requests: int) -> tuple[int, int]:
    """(the loop's thread, the thread the step ran on) with ``requests`` image requests in flight."""

    async def scenario() -> tuple[int, int]:
        with steps.request():
            if requests > 1:
                with steps.request():
                    return threading.get_ident(), await steps.run(pixels, threading.get_ident)
            return threading.get_ident(), await steps.run(pixels, threading.get_ident)

    return asyncio.run(scenario())


def test_a_lone_request_runs_a_small_images_step_on_the_event_loop():
    loop_thread, step_thread = thread_of_step(CpuSteps(), SMALL, requests=1)
    assert step_thread == loop_thread


def test_a_step_goes_to_the_thread_pool_while_another_image_request_is_in_flight():
    loop_thread, step_thread = thread_of_step(CpuSteps(), SMALL, requests=2)
    assert step_thread != loop_thread


def test_a_large_images_step_goes_to_the_thread_pool_even_alone():
    loop_thread, step_thread = thread_of_step(CpuSteps(), LARGE, requests=1)
    assert step_thread != loop_thread


def test_a_finished_request_no_longer_counts_as_in_flight():
    steps = CpuSteps()
    thread_of_step(steps, SMALL, requests=2)
    loop_thread, step_thread = thread_of_step(steps, SMALL, requests=1)
    assert step_thread == loop_thread


def test_a_steps_error_reaches_the_caller_wherever_it_ran():
    def fail() -> None:
        raise ValueError("corrupt")

    async def scenario(pixels: int) -> None:
        steps = CpuSteps()
        with steps.request():
            await steps.run(pixels, fail)

    for pixels in (SMALL, LARGE):
        with pytest.raises(ValueError, match="corrupt"):
            asyncio.run(scenario(pixels))
