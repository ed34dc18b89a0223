"""deployments/birefnet.py against the tiny BiRefNet from scripts/make_tiny_models.py.

The tiny model is laid out and coded like the published BiRefNet / RMBG-2.0 repos
(their quirks included), loads through the real path (deployments.remote_code: the
repo's own code, safetensors) and its output follows a known rule: red-ish pixels are
foreground, logit = (R - (G + B) / 2 - 64) / 4 (see its module docstring).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deployments.birefnet import BiRefNetEngine
from deployments.engine import EngineInfo, SegmentationEngine
from deployments.weights import WeightsUnavailable
from tests.conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # the tiny model runs at any size; the engine's default stays 1024
RED, GREY, BLUE = (220, 30, 30), (128, 128, 128), (40, 60, 200)


make_tiny_models = load_script("make_tiny_models")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_models.make_tiny_birefnet(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_rmbg_dir(tmp_path_factory):
    return make_tiny_models.make_tiny_rmbg(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(hf_env, tiny_dir):
    engine = BiRefNetEngine(str(tiny_dir), device="cpu", input_size=SIZE)
    engine.load()
    return engine


def _disc_image(size=SIZE, center=(32, 30), radius=15, fg=RED, bg=GREY):
    image = np.empty((size, size, 3), np.uint8)
    image[:] = bg
    disc = _disc(size, center, radius)
    image[disc] = fg
    return image, disc


def _disc(size, center, radius, width=None):
    yy, xx = np.mgrid[:size, : width or size]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 < radius**2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# ----------------------------------------------------------------- the tiny model


def test_tiny_birefnet_directory_holds_config_remote_code_and_safetensors(tiny_dir):
    import json

    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "BiRefNet_config.BiRefNetConfig",
                                  "AutoModelForImageSegmentation": "birefnet.BiRefNet"}
    assert (tiny_dir / "birefnet.py").is_file() and (tiny_dir / "BiRefNet_config.py").is_file()
    assert (tiny_dir / "model.safetensors").is_file()


def test_tiny_birefnet_fails_in_from_pretrained_as_the_published_code_does(hf_env, tiny_dir):
    # Its code replaces self.config with a plain object and never calls post_init(),
    # as the published code does: transformers 5's from_pretrained cannot load it.
    from transformers import AutoModelForImageSegmentation

    with pytest.raises(AttributeError, match="model_type|all_tied_weights_keys"):
        AutoModelForImageSegmentation.from_pretrained(str(tiny_dir), trust_remote_code=True)


def test_the_remote_code_loader_loads_it_and_it_returns_logit_maps(hf_env, tiny_dir):
    import torch

    from deployments.remote_code import load_remote_model

    model = load_remote_model(tiny_dir)
    x = torch.zeros(2, 3, 48, 40)
    with torch.inference_mode():
        out = model.eval()(x)
    assert isinstance(out, list) and len(out) > 1
    assert out[-1].shape == (2, 1, 48, 40)


def test_make_tiny_birefnet_is_idempotent(tmp_path):
    first = make_tiny_models.make_tiny_birefnet(tmp_path)
    weights = (first / "model.safetensors").read_bytes()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_models.make_tiny_birefnet(tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    make_tiny_models.make_tiny_birefnet(tmp_path, force=True)
    assert (first / "model.safetensors").read_bytes() == weights  # deterministic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["birefnet"]  # no leftovers


def test_weights_that_do_not_match_the_code_are_refused_naming_them(hf_env, tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from deployments.remote_code import load_remote_model

    broken = tmp_path / "mismatched-weights"
    shutil.copytree(tiny_dir, broken)
    state = load_file(broken / "model.safetensors")
    state["extra.weight"] = state.pop("redness.weight")
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 \(redness.weight\) missing, 1 \(extra.weight\) unexpected"):
        load_remote_model(broken)


def test_script_main_builds_into_out(tmp_path, capsys):
    assert make_tiny_models.main(["--out", str(tmp_path / "m"), "--only", "birefnet"]) == 0
    assert (tmp_path / "m" / "birefnet" / "config.json").is_file()
    assert "birefnet" in capsys.readouterr().out


def test_script_runs_as_a_file():
    result = subprocess.run([sys.executable, "scripts/make_tiny_models.py", "--help"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert "--out" in result.stdout


# ----------------------------------------------------------------- the engine


def test_engine_is_a_segmentation_engine_with_the_real_default_size():
    engine = BiRefNetEngine("ZhengPeng7/BiRefNet")
    assert isinstance(engine, SegmentationEngine)
    assert engine.info.input_size == (1024, 1024)
    assert not engine.loaded


def test_engine_info_after_load(engine):
    assert engine.info == EngineInfo(engine="birefnet", device="cpu", dtype="float32",
                                     input_size=(SIZE, SIZE))


def test_red_disc_on_grey_gives_a_mask_of_the_disc(engine):
    image, disc = _disc_image()
    (mask,) = engine.predict([image])
    assert mask.shape == (SIZE, SIZE)
    assert _iou(mask >= 128, disc) >= 0.9


def test_batch_of_three_equals_three_single_calls(engine):
    images = [
        _disc_image(center=(20, 20), radius=10)[0],
        _disc_image(center=(40, 44), radius=18, bg=BLUE)[0],
        np.full((SIZE, SIZE, 3), GREY, np.uint8),
    ]
    batched = engine.predict(images)
    singles = [engine.predict([image])[0] for image in images]
    assert len(batched) == 3
    for b, s in zip(batched, singles):
        np.testing.assert_array_equal(b, s)


def test_masks_are_uint8(engine):
    (mask,) = engine.predict([_disc_image()[0]])
    assert mask.dtype == np.uint8
    assert mask.min() == 0 and mask.max() == 255


def test_all_background_image_gives_an_empty_mask_not_a_stretched_one(engine):
    (mask,) = engine.predict([np.full((SIZE, SIZE, 3), GREY, np.uint8)])
    assert mask.max() <= 1


def test_mask_is_the_sigmoid_times_255_not_thresholded(engine):
    # (160, 96, 96) sits exactly on the tiny model's decision boundary: logit 0.
    (mask,) = engine.predict([np.full((SIZE, SIZE, 3), (160, 96, 96), np.uint8)])
    assert np.all(np.abs(mask.astype(int) - 128) <= 1)


def test_images_of_another_size_are_resized_and_masks_keep_their_size(engine):
    h, w = 48, 100
    image = np.full((h, w, 3), GREY, np.uint8)
    disc = _disc(h, (24, 60), 16, width=w)
    image[disc] = RED
    (mask,) = engine.predict([image])
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    assert _iou(mask >= 128, disc) >= 0.9


def test_empty_batch_gives_no_masks(engine):
    assert engine.predict([]) == []


def test_predict_before_load_raises(tiny_dir):
    with pytest.raises(RuntimeError, match="before load"):
        BiRefNetEngine(str(tiny_dir), input_size=SIZE).predict([_disc_image()[0]])


def test_float16_on_cpu_runs_in_float32(hf_env, tiny_dir):
    engine = BiRefNetEngine(str(tiny_dir), device="cpu", dtype="float16", input_size=SIZE)
    engine.load()
    assert engine.info.dtype == "float32"


def test_hub_id_loads_from_the_hf_cache_offline(hf_env, tiny_dir):
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = hf_env / "hub" / "models--strata-tests--tiny-birefnet"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    engine = BiRefNetEngine("strata-tests/tiny-birefnet", device="cpu", input_size=SIZE)
    engine.load()
    image, disc = _disc_image()
    assert _iou(engine.predict([image])[0] >= 128, disc) >= 0.9


def test_missing_local_directory_raises_weights_unavailable(hf_env, tmp_path):
    engine = BiRefNetEngine(str(tmp_path / "missing"), input_size=SIZE)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        engine.load()


def test_uncached_hub_id_offline_raises_weights_unavailable_naming_it(hf_env):
    with pytest.raises(WeightsUnavailable) as info:
        BiRefNetEngine("briaai/RMBG-2.0", input_size=SIZE).load()
    assert "briaai/RMBG-2.0" in info.value.reason


def test_importing_the_engine_does_not_import_torch():
    code = ("import sys, deployments.birefnet; "
            "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# ----------------------------------------------------------------- speed options (the GPU paths, run on CPU)
#
# Each option must give the plain path's masks. Tolerances: float32 options may
# differ by rounding only (1 level of 255); bfloat16 keeps 8 bits of mantissa, so
# masks may move by a few levels where the logit is near 0 (soft edges).


def _soft_scene():
    """Two images with soft (blurred) edges, so masks have many intermediate values."""
    import cv2

    a = np.full((SIZE, SIZE, 3), GREY, np.uint8)
    cv2.circle(a, (30, 34), 18, RED, -1, cv2.LINE_AA)
    b = np.full((SIZE, SIZE, 3), BLUE, np.uint8)
    cv2.rectangle(b, (8, 10), (40, 50), (230, 40, 50), -1, cv2.LINE_AA)
    return [cv2.GaussianBlur(a, (0, 0), 2), cv2.GaussianBlur(b, (0, 0), 2)]


def _loaded(tiny_dir, **options):
    engine = BiRefNetEngine(str(tiny_dir), device="cpu", input_size=SIZE, **options)
    engine.load()
    return engine


def _max_diff(masks, reference):
    return max(int(np.abs(m.astype(int) - r.astype(int)).max()) for m, r in zip(masks, reference, strict=True))


@pytest.mark.parametrize("model", ["birefnet", "rmbg-2.0"])
def test_autocast_on_cpu_runs_in_bfloat16_within_4_levels_of_float32(engine, tiny_dir, tiny_rmbg_dir, model):
    weights = tiny_dir if model == "birefnet" else tiny_rmbg_dir
    autocast = _loaded(weights, dtype="autocast")
    assert autocast.info.dtype == "autocast(bfloat16)"
    masks, reference = autocast.predict(_soft_scene()), engine.predict(_soft_scene())
    assert _max_diff(masks, reference) <= 4
    assert np.mean([np.abs(m.astype(int) - r.astype(int)).mean() for m, r in zip(masks, reference)]) < 0.5


@pytest.mark.parametrize("model", ["birefnet", "rmbg-2.0"])
def test_auto_runs_float32_on_the_cpu(hf_env, tiny_dir, tiny_rmbg_dir, model):
    engine = _loaded(tiny_dir if model == "birefnet" else tiny_rmbg_dir, dtype="auto")
    assert engine.info.dtype == "float32"
    image, disc = _disc_image()
    assert _iou(engine.predict([image])[0] >= 128, disc) >= 0.9


def test_auto_on_a_gpu_picks_float16_for_birefnet_and_autocast_for_rmbg():
    # No GPU here: what auto resolves to on "cuda" is decided before any CUDA call.
    import torch

    birefnet = BiRefNetEngine("ZhengPeng7/BiRefNet")._resolve_precision("cuda")
    rmbg = BiRefNetEngine("briaai/RMBG-2.0")._resolve_precision("cuda")
    assert birefnet == (torch.float16, None)
    assert rmbg == (torch.float32, torch.float16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rmbg_in_half_precision_fails_as_its_published_code_does(hf_env, tiny_rmbg_dir, dtype):
    # Why RMBG-2.0 refuses half dtypes: its float32 window mask meets half attention.
    import torch

    from deployments.remote_code import load_remote_model

    model = load_remote_model(tiny_rmbg_dir).to(getattr(torch, dtype))
    with pytest.raises(RuntimeError, match="same dtype"):
        model(torch.zeros(1, 3, SIZE, SIZE, dtype=getattr(torch, dtype)))


@pytest.mark.parametrize(("weights", "dtype", "why"), [
    ("ZhengPeng7/BiRefNet", "bfloat16", "deform_conv2d"),
    ("ZhengPeng7/BiRefNet", "bf16", "deform_conv2d"),
    ("briaai/RMBG-2.0", "float16", "window mask"),
    ("briaai/RMBG-2.0", "bfloat16", "window mask"),
])
def test_a_dtype_the_family_cannot_run_is_refused_with_the_reason(weights, dtype, why):
    with pytest.raises(ValueError, match=why):
        BiRefNetEngine(weights, dtype=dtype)


def test_the_model_config_refuses_a_dtype_the_family_cannot_run():
    from pydantic import ValidationError

    from deployments.segmentation import SegmentationModelConfig

    with pytest.raises(ValidationError, match="deform_conv2d"):
        SegmentationModelConfig(engine="birefnet", weights="ZhengPeng7/BiRefNet", dtype="bfloat16")
    with pytest.raises(ValidationError, match="window mask"):
        SegmentationModelConfig(engine="birefnet", weights="/models/rmbg", family="rmbg-2.0", dtype="float16")
    assert SegmentationModelConfig(engine="birefnet", weights="briaai/RMBG-2.0", dtype="autocast").dtype == "autocast"


def test_channels_last_gives_the_same_masks(engine, tiny_dir):
    masks = _loaded(tiny_dir, channels_last=True).predict(_soft_scene())
    assert _max_diff(masks, engine.predict(_soft_scene())) <= 1


def test_pin_memory_without_cuda_gives_the_same_masks(engine, tiny_dir):
    # Page-locked memory needs CUDA: on the CPU the option is accepted and the plain
    # copy path runs (the pinned one cannot run here).
    masks = _loaded(tiny_dir, pin_memory=True).predict(_soft_scene())
    assert _max_diff(masks, engine.predict(_soft_scene())) == 0


def test_warm_up_runs_the_model_at_load_only_when_asked(tiny_dir):
    assert _loaded(tiny_dir).warmup_s is None
    warm = _loaded(tiny_dir, warmup=True)
    assert warm.warmup_s is not None and warm.warmup_s > 0


def test_compiled_model_gives_the_same_masks_and_compiles_during_warm_up(engine, tiny_dir):
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    compiled = _loaded(tiny_dir, compile=True, warmup=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before  # the warm-up compiled the model
    images = _soft_scene()
    masks = compiled.predict(images) + compiled.predict(images[:1])
    # The first requests (batches of 1 and 2) find the model compiled. (A batch size not
    # warmed up may still compile once: the tiny model's graph depends on it.)
    assert counters["stats"]["unique_graphs"] == graphs
    reference = engine.predict(images)
    assert _max_diff(masks, reference + reference[:1]) <= 1


def test_a_batch_runs_one_model_call_per_input_shape(tiny_dir):
    dynamic = _loaded(tiny_dir, dynamic_size=True)
    shapes = []
    hook = dynamic._model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    wide, tall = _disc_image()[0][:32], _disc_image()[0][:, :32]  # 32x64 and 64x32
    try:
        masks = dynamic.predict([wide, tall, wide, tall, wide])
    finally:
        hook.remove()
    assert sorted(shapes) == [(2, 3, 64, 32), (3, 3, 32, 64)]  # two calls, none mixed or padded
    assert [m.shape for m in masks] == [(32, 64), (64, 32), (32, 64), (64, 32), (32, 64)]


def test_a_batch_of_one_fixed_size_is_one_model_call(engine):
    shapes = []
    hook = engine._model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        engine.predict([_disc_image()[0], np.full((48, 100, 3), GREY, np.uint8)])
    finally:
        hook.remove()
    assert shapes == [(2, 3, SIZE, SIZE)]


def test_dynamic_size_keeps_the_aspect_in_multiples_of_32_up_to_input_size(tiny_dir):
    dynamic = BiRefNetEngine(str(tiny_dir), device="cpu", input_size=1024, dynamic_size=True)
    assert dynamic.info.input_size is None and dynamic.info.max_side == 1024
    assert dynamic.run_shape(np.zeros((600, 800, 3), np.uint8)) == (608, 800)
    assert dynamic.run_shape(np.zeros((1500, 3000, 3), np.uint8)) == (512, 1024)
    assert dynamic.run_shape(np.zeros((10, 20, 3), np.uint8)) == (32, 32)


def test_dynamic_size_masks_match_the_disc_at_the_image_size(tiny_dir):
    dynamic = _loaded(tiny_dir, dynamic_size=True)
    h, w = 48, 100
    image = np.full((h, w, 3), GREY, np.uint8)
    disc = _disc(h, (24, 60), 16, width=w)
    image[disc] = RED
    (mask,) = dynamic.predict([image])
    assert mask.shape == (h, w)
    assert _iou(mask >= 128, disc) >= 0.9


def test_the_model_config_passes_every_speed_option_to_the_engine(hf_env, tiny_dir):
    from deployments.segmentation import SegmentationModelConfig, load_engine

    config = SegmentationModelConfig(engine="birefnet", weights=str(tiny_dir), device="cpu", dtype="autocast",
                                     input_size=SIZE, dynamic_size=True, channels_last=True, pin_memory=False)
    engine, fallback_reason = load_engine("tiny", config)
    assert fallback_reason is None
    assert (engine.info.dtype, engine.dynamic_size, engine.channels_last, engine.pin_memory, engine.compile) == (
        "autocast(bfloat16)", True, True, False, False)
    assert engine.warmup_s is not None  # warm-up is on by default in the service's config


# ----------------------------------------------------------------- failures fall back


def _tiny_copy_with(tiny_dir: Path, tmp_path: Path, code: str) -> Path:
    """A copy of the tiny model whose birefnet.py also runs ``code`` (a broken repo),
    in a folder of its own name: the module cache keys remote code by folder name."""
    broken = tmp_path / f"broken-{tmp_path.name}"
    shutil.copytree(tiny_dir, broken)
    source = (broken / "birefnet.py").read_text()
    (broken / "birefnet.py").write_text(source.replace("import torch\n", f"import torch\n{code}\n", 1))
    return broken


def _config(weights: Path, fallback: str | None = "classic"):
    from deployments.segmentation import SegmentationModelConfig

    return SegmentationModelConfig(engine="birefnet", weights=str(weights), device="cpu", input_size=SIZE,
                                   fallback=fallback, warmup=False)


def test_code_that_raises_while_loading_falls_back_with_the_exception_type_and_message(hf_env, tiny_dir, tmp_path):
    from deployments.segmentation import load_engine

    broken = _tiny_copy_with(tiny_dir, tmp_path, "raise AttributeError('Config has no attribute model_type')")
    engine, reason = load_engine("tiny", _config(broken))
    assert engine.info.engine == "classic"
    assert "AttributeError" in reason and "Config has no attribute model_type" in reason


def test_code_that_raises_without_a_fallback_is_a_startup_error_naming_the_model(hf_env, tiny_dir, tmp_path):
    from deployments.segmentation import load_engine

    broken = _tiny_copy_with(tiny_dir, tmp_path, "raise AttributeError('Config has no attribute model_type')")
    with pytest.raises(RuntimeError, match="model 'tiny' cannot be loaded: .*AttributeError"):
        load_engine("tiny", _config(broken, fallback=None))


def test_code_that_needs_a_missing_package_falls_back_naming_it_and_the_install_command(hf_env, tiny_dir, tmp_path):
    from deployments.segmentation import load_engine

    broken = _tiny_copy_with(tiny_dir, tmp_path, "import strata_no_such_package")
    engine, reason = load_engine("tiny", _config(broken))
    assert engine.info.engine == "classic"
    assert "strata_no_such_package" in reason and "pip install -e '.[remote-code]'" in reason
