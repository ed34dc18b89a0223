"""deployments/qwen_layered.py against the tiny QwenImageLayeredPipeline of
scripts/make_tiny_models.py.

The tiny pipeline loads through the real path (QwenImageLayeredPipeline.from_pretrained
on a diffusers directory) and runs the real denoising loop; its weights are random, so
its layers are noise: these tests check plumbing, not quality. Each pipeline run takes
seconds on a CPU (VAE at the 640 bucket), so the engine is loaded once and runs are few:
2 steps, 2 layers, a 64x48 input.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="needs diffusers (QwenImageLayeredPipeline)")

from deployments import qwen_layered  # noqa: E402
from deployments.engine import DecompositionCancelled, LayerParams  # noqa: E402
from deployments.qwen_layered import QwenLayeredEngine  # noqa: E402
from deployments.weights import WeightsUnavailable  # noqa: E402
from tests.conftest import load_script  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 48, 64
PARAMS = LayerParams(layers=2, resolution=640, steps=2, seed=7, prompt="a red square on grey")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        return load_script("make_tiny_models").make_tiny_qwen_image_layered(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    engine = QwenLayeredEngine(str(tiny_dir), device="cpu")
    engine.load()
    return engine


@pytest.fixture(scope="module")
def image():
    rgba = np.empty((HEIGHT, WIDTH, 4), np.uint8)
    rgba[:] = (128, 128, 128, 255)
    rgba[10:30, 20:44] = (220, 30, 30, 255)
    return rgba


@pytest.fixture(scope="module")
def first_run(engine, image):
    """One decomposition with PARAMS, recording its progress calls."""
    calls = []

    def on_step(step, total):
        calls.append((step, total))
        return True

    return engine.decompose(image, PARAMS, on_step=on_step), calls


def test_returns_the_requested_number_of_rgba_layers_of_the_input_size(first_run):
    layers, _ = first_run
    assert len(layers) == PARAMS.layers
    for layer in layers:
        assert layer.shape == (HEIGHT, WIDTH, 4)
        assert layer.dtype == np.uint8


def test_on_step_is_called_once_per_step_with_step_and_total(first_run):
    _, calls = first_run
    assert calls == [(1, 2), (2, 2)]


def test_on_step_returning_false_cancels_before_the_next_step(engine, image):
    calls = []
    forwards = []
    hook = engine._pipe.transformer.register_forward_hook(lambda *args: forwards.append(1))

    def on_step(step, total):
        calls.append((step, total))
        return False

    try:
        with pytest.raises(DecompositionCancelled):
            engine.decompose(image, LayerParams(layers=2, steps=3, seed=1, prompt="x"), on_step=on_step)
    finally:
        hook.remove()
    assert calls == [(1, 3)]
    assert len(forwards) == 2  # one step: a conditional and a CFG (negative prompt) pass


def test_same_seed_gives_identical_layers(engine, image, first_run):
    again = engine.decompose(image, PARAMS)
    for a, b in zip(first_run[0], again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_auto_device_without_gpu_is_unavailable_without_loading(tiny_dir, monkeypatch):
    import torch

    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline must not be loaded without a GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(qwen_layered, "load_pretrained", no_load)
    engine = QwenLayeredEngine(str(tiny_dir), device="auto")
    with pytest.raises(WeightsUnavailable) as info:
        engine.load()
    assert "no GPU" in info.value.reason and "device: cpu" in info.value.reason
    assert not engine.loaded


def test_resolution_other_than_640_or_1024_is_a_value_error(engine, image):
    with pytest.raises(ValueError, match="640 or 1024"):
        engine.decompose(image, LayerParams(layers=2, resolution=512, steps=1, prompt="x"))


def test_empty_prompt_without_a_captioner_is_a_value_error(engine, image):
    # The tiny pipeline has no Qwen2VLProcessor (as any pipeline loaded without
    # torchvision): it cannot caption, and the raw pipeline would fail with a TypeError.
    assert not engine.can_caption
    with pytest.raises(ValueError, match="prompt is required"):
        engine.decompose(image, LayerParams(layers=2, steps=1, prompt="  "))


def test_importing_the_module_imports_neither_torch_nor_diffusers():
    code = ("import sys, deployments.qwen_layered; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------- speed options (the GPU paths, run on CPU)
#
# Each option must give the plain path's layers (first_run) within 4 levels of 255
# on every pixel: attention backends and CPU offload change nothing here; bfloat16 and
# First Block Cache change the tiny pipeline's layers by a level at most.

TOLERANCE = 4


def _loaded(tiny_dir, **options):
    engine = QwenLayeredEngine(str(tiny_dir), device="cpu", **options)
    engine.load()
    return engine


def _assert_close(layers, reference):
    assert len(layers) == len(reference)
    for a, b in zip(layers, reference):
        assert a.shape == b.shape
        assert int(np.abs(a.astype(int) - b.astype(int)).max()) <= TOLERANCE


def _count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *args: calls.append(1))


def test_native_attention_backend_gives_the_same_layers(tiny_dir, image, first_run):
    _assert_close(_loaded(tiny_dir, attention_backend="native").decompose(image, PARAMS), first_run[0])


def test_bfloat16_on_cpu_runs_in_bfloat16_within_tolerance(tiny_dir, image, first_run):
    bf16 = _loaded(tiny_dir, dtype="bfloat16")
    assert bf16.info.dtype == "bfloat16"
    _assert_close(bf16.decompose(image, PARAMS), first_run[0])


def test_cpu_offload_without_a_gpu_is_ignored_and_gives_the_same_layers(tiny_dir, image, first_run):
    _assert_close(_loaded(tiny_dir, cpu_offload=True).decompose(image, PARAMS), first_run[0])


def test_first_block_cache_skips_the_later_blocks_when_the_first_barely_changes(tiny_dir, image, first_run):
    # A threshold this high always counts as "barely changed": after the first step,
    # every step reuses the cached residual of the blocks after the first.
    cached = _loaded(tiny_dir, first_block_cache_threshold=1e9)
    calls, hook = _count_calls(cached._pipe.transformer.transformer_blocks[-1].img_mlp)
    try:
        layers = cached.decompose(image, PARAMS)
    finally:
        hook.remove()
    assert len(calls) == 2  # step 1 only (conditional + CFG pass); step 2 skipped it
    _assert_close(layers, first_run[0])


def test_first_block_cache_state_does_not_leak_into_the_next_decomposition(tiny_dir, image):
    # One step each: were the first call's cache left over, the second call's only step
    # would be skipped and reuse it.
    one_step = LayerParams(layers=2, resolution=640, steps=1, seed=7, prompt="a red square on grey")
    cached = _loaded(tiny_dir, first_block_cache_threshold=1e9)
    first, second = cached.decompose(image, one_step), cached.decompose(image, one_step)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_first_block_cache_threshold_must_be_positive(tiny_dir):
    with pytest.raises(ValueError, match="first_block_cache_threshold"):
        QwenLayeredEngine(str(tiny_dir), device="cpu", first_block_cache_threshold=0)


def test_warm_up_decomposes_once_at_load_and_leaves_results_unchanged(tiny_dir, image, first_run):
    assert _loaded(tiny_dir).warmup_s is None
    warm = _loaded(tiny_dir, warmup=True)
    assert warm.warmup_s is not None and warm.warmup_s > 0
    for a, b in zip(warm.decompose(image, PARAMS), first_run[0], strict=True):
        np.testing.assert_array_equal(a, b)
