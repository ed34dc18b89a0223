"""The real-size stand-ins of scripts/make_real_size_models.py: BiRefNet- and
BiRefNet_lite-class models with random weights through the engine's real loading
path, and Qwen-Image-Layered's real-size components on the meta device, against the
adapter's call.

The full BiRefNet-class model costs about a minute here (880 MB written and read back,
one 1024x1024 forward of ~45 s on two cores): that test is marked ``slow``. It still
runs in ``make test``; ``-m 'not slow'`` leaves it out.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from deployments.birefnet import BiRefNetEngine
from tests.conftest import load_script

real_size = load_script("make_real_size_models")


@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory):
    return real_size.make_real_size_birefnet(tmp_path_factory.mktemp("real-size"), "birefnet_lite")


# ----------------------------------------------------------------- BiRefNet class


def test_the_directory_is_laid_out_as_the_published_repos(lite_dir):
    from safetensors import safe_open

    config = json.loads((lite_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "BiRefNet_config.BiRefNetConfig",
                                  "AutoModelForImageSegmentation": "birefnet.BiRefNet"}
    assert config["bb_pretrained"] is False
    source = (lite_dir / "birefnet.py").read_text()
    assert 'BACKBONE = "swin_v1_t"' in source
    # The published code's quirks: self.config replaced by a plain object, no post_init().
    assert "self.config = Config()" in source and "self.post_init()" not in source
    with safe_open(lite_dir / "model.safetensors", "pt") as f:
        # save_file(state_dict), not save_pretrained (which stamps {"format": "pt"}).
        assert f.metadata() is None
        assert any(k.startswith("bb.stages.3.blocks.") for k in f.keys())


def test_from_pretrained_fails_on_it_as_on_the_published_code(hf_env, lite_dir):
    from transformers import AutoModelForImageSegmentation

    with pytest.raises(AttributeError, match="model_type|all_tied_weights_keys"):
        AutoModelForImageSegmentation.from_pretrained(str(lite_dir), trust_remote_code=True)


def test_sizes_match_the_published_architectures():
    full = real_size.build_birefnet("birefnet")
    # BiRefNet (Swin-L backbone): ~220M parameters published; Swin-L without its
    # classification head is 195.2M (timm's swin_large_patch4_window12_384: 196.7M with it).
    assert real_size.count_parameters(full) == pytest.approx(220e6, rel=0.01)
    assert real_size.count_parameters(full.bb) == pytest.approx(195.2e6, rel=0.002)
    assert (full.config.embed_dim, full.config.depths, full.config.num_heads, full.config.window_size) == (
        192, (2, 2, 18, 2), (6, 12, 24, 48), 12)
    del full
    lite = real_size.build_birefnet("birefnet_lite")
    # Swin-T without its head: 27.5M (timm's swin_tiny_patch4_window7_224: 28.3M with it).
    assert real_size.count_parameters(lite.bb) == pytest.approx(27.5e6, rel=0.005)
    assert real_size.count_parameters(lite) == pytest.approx(44.3e6, rel=0.01)
    assert (lite.config.embed_dim, lite.config.depths, lite.config.window_size) == (96, (2, 2, 6, 2), 7)


def test_lite_loads_through_the_engine_and_returns_logit_maps_in_eval_and_training(hf_env, lite_dir):
    import torch

    engine = BiRefNetEngine(str(lite_dir), device="cpu", input_size=256)
    engine.load()
    image = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    (mask,) = engine.predict([image])
    assert mask.shape == (300, 200) and mask.dtype == np.uint8
    model = engine._model  # the loaded module itself: its raw outputs
    x = torch.randn(2, 3, 128, 96)
    with torch.inference_mode():
        out = model.eval()(x)
    assert isinstance(out, list) and len(out) == 1 and out[-1].shape == (2, 1, 128, 96)
    model.train()  # multi-scale supervision: 1/32, 1/16, 1/8, then full size
    try:
        with torch.no_grad():
            shapes = [tuple(o.shape) for o in model(x)]
    finally:
        model.eval()
    assert shapes == [(2, 1, 4, 3), (2, 1, 8, 6), (2, 1, 16, 12), (2, 1, 128, 96)]


def test_building_is_idempotent_and_deterministic(lite_dir):
    weights = lite_dir / "model.safetensors"
    before = weights.read_bytes()
    mtime = weights.stat().st_mtime_ns
    assert real_size.make_real_size_birefnet(lite_dir.parent, "birefnet_lite") == lite_dir
    assert weights.stat().st_mtime_ns == mtime  # left alone
    real_size.make_real_size_birefnet(lite_dir.parent, "birefnet_lite", force=True)
    assert weights.stat().st_mtime_ns != mtime and weights.read_bytes() == before  # the same bytes again
    assert sorted(p.name for p in lite_dir.parent.iterdir()) == ["birefnet_lite"]  # no leftovers


@pytest.mark.slow
def test_full_size_birefnet_class_loads_through_the_engine_and_masks_a_1024_image(hf_env, tmp_path):
    import torch

    path = real_size.main(["--out", str(tmp_path), "--only", "birefnet"]) == 0 and tmp_path / "birefnet"
    assert path and (path / "model.safetensors").stat().st_size > 800e6  # fp32, ~220M parameters
    engine = BiRefNetEngine(str(path), device="cpu", input_size=1024)
    engine.load()
    assert real_size.count_parameters(engine._model) == pytest.approx(220e6, rel=0.01)
    image = np.random.default_rng(1).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    calls = []
    model = engine._model
    # Record the model's raw output through the engine's own call (one forward, ~45 s here).
    # (A copy: the engine turns the logits into the mask in place.)
    hook = model.register_forward_hook(lambda module, args, out: calls.append([o.clone() for o in out]))
    try:
        (mask,) = engine.predict([image])
    finally:
        hook.remove()
    assert mask.shape == (1024, 1024) and mask.dtype == np.uint8
    (logits,) = calls[0]
    assert logits.shape == (1, 1, 1024, 1024)
    probabilities = logits.float().sigmoid()
    assert torch.isfinite(logits).all() and 0.0 <= probabilities.min() <= probabilities.max() <= 1.0
    assert np.array_equal(mask, probabilities[0, 0].mul(255).round().to(torch.uint8).numpy())  # no stretch


# ----------------------------------------------------------------- Qwen-Image-Layered


@pytest.fixture(scope="module")
def meta_pipeline():
    pytest.importorskip("diffusers", reason="needs diffusers (QwenImageLayeredPipeline)")
    return real_size.build_qwen_layered_on_meta()


def test_qwen_layered_constructs_at_real_size_on_meta_with_the_published_sizes(meta_pipeline):
    report = real_size.qwen_layered_report(meta_pipeline)
    parts = report["components"]
    # Published: a 20B MMDiT (Qwen-Image), Qwen2.5-VL-7B (8.29B), ~55 GB of bf16 weights in all.
    assert parts["transformer"]["parameters"] == pytest.approx(20.4e9, rel=0.01)
    assert parts["text_encoder"]["parameters"] == pytest.approx(8.29e9, rel=0.002)
    assert 0.05e9 < parts["vae"]["parameters"] < 0.3e9
    assert 50 < report["total_bf16_gib"] < 56
    assert all(p.device.type == "meta" for p in meta_pipeline.transformer.parameters())


def test_qwen_layered_real_size_components_are_wired_as_the_pipeline_needs(meta_pipeline):
    t, vae = meta_pipeline.transformer.config, meta_pipeline.vae.config
    text = meta_pipeline.text_encoder.config.text_config
    assert t.joint_attention_dim == text.hidden_size == 3584
    assert t.in_channels == 4 * vae.z_dim and t.out_channels == vae.z_dim  # 2x2 patches of the latents
    assert sum(t.axes_dims_rope) == t.attention_head_dim
    assert t.use_layer3d_rope and t.use_additional_t_cond and vae.input_channels == 4
    assert meta_pipeline.vae_scale_factor == 8


class _RecordingPipeline:
    """Stands in for the pipeline object: binds each call to QwenImageLayeredPipeline's
    real ``__call__`` signature and runs the step callback as the pipeline does."""

    def __init__(self):
        from diffusers import QwenImageLayeredPipeline

        self.signature = inspect.signature(QwenImageLayeredPipeline.__call__)
        self.calls = []
        self.processor = None
        self.num_timesteps = None

    def __call__(self, **kwargs):
        from PIL import Image

        bound = self.signature.bind(self, **kwargs)  # TypeError on an argument it does not take
        self.calls.append(bound.arguments)
        steps = kwargs["num_inference_steps"]
        self.num_timesteps = steps
        for i in range(steps):  # the pipeline's call: callback_on_step_end(self, i, t, callback_kwargs)
            assert isinstance(kwargs["callback_on_step_end"](self, i, 1000 - i, {"latents": None}), dict)
        size = kwargs["image"].size
        layer = Image.new("RGBA", size, (0, 0, 0, 0))
        return type("Output", (), {"images": [[layer] * kwargs["layers"]]})()

    def maybe_free_model_hooks(self):
        """The pipeline's own method the adapter calls on errors."""


def test_the_adapters_call_fits_the_real_pipeline_signature():
    pytest.importorskip("diffusers", reason="needs diffusers (QwenImageLayeredPipeline)")
    from diffusers import QwenImageLayeredPipeline

    from deployments.engine import LayerParams
    from deployments.qwen_layered import QwenLayeredEngine

    source = inspect.getsource(QwenImageLayeredPipeline.__call__)
    assert "callback_on_step_end(self, i, t, callback_kwargs)" in source  # how the callback is called
    engine = QwenLayeredEngine("unused", device="cpu")
    recorder = _RecordingPipeline()
    engine._pipe, engine._device = recorder, "cpu"  # the adapter's call without 55 GB behind it
    steps = []
    image = np.full((48, 64, 4), 200, np.uint8)
    layers = engine.decompose(image, LayerParams(layers=3, resolution=640, steps=2, seed=5, prompt="a cat"),
                              on_step=lambda step, total: steps.append((step, total)))
    assert len(layers) == 3 and layers[0].shape == (48, 64, 4)
    assert steps == [(1, 2), (2, 2)]
    (call,) = recorder.calls
    parameters = recorder.signature.parameters
    assert set(call) - {"self"} <= set(parameters)
    assert call["resolution"] in (640, 1024) and call["layers"] == 3 and call["num_inference_steps"] == 2
    assert call["prompt"] == "a cat" and call["negative_prompt"] == " "  # CFG needs a negative prompt
    assert call["true_cfg_scale"] == 4.0 == parameters["true_cfg_scale"].default
    # The model card's settings, which are not the pipeline's defaults, are passed explicitly.
    assert call["cfg_normalize"] is True and parameters["cfg_normalize"].default is False
    assert call["use_en_prompt"] is True and parameters["use_en_prompt"].default is False
    assert call["num_images_per_prompt"] == 1  # one image per call (batches mis-group outputs)
    assert call["generator"].initial_seed() == 5


def test_bench_real_size_measures_each_case_in_its_own_process_and_reports_failures(hf_env, lite_dir):
    bench = load_script("bench")
    cases = [bench.RealSizeCase("birefnet_lite", input_size=64, batches=(1, 2)),
             bench.RealSizeCase("birefnet_lite", input_size=48)]  # not a multiple of 32: the model fails
    result = bench.bench_real_size(bench.QUICK, cases=cases, weights_dir=lite_dir.parent)
    ok, failed = result["cases"]
    assert [row["batch"] for row in ok["rows"]] == [1, 2] and ok["engine_dtype"] == "float32"
    assert all(row["ms_per_image"] > 0 and row["peak_rss_mib"] > 100 for row in ok["rows"])
    assert ok["best_batch"] in (1, 2) and ok["peak_rss_mib"] == max(r["peak_rss_mib"] for r in ok["rows"])
    assert "error" in failed and "rows" not in failed
