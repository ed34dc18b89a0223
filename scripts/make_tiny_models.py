#!/usr/bin/env python
"""Write tiny stand-ins for the real models, offline, so tests run the real loading code.

    python scripts/make_tiny_models.py [--out models/tiny] [--force] [--only birefnet]

Each model is one function ``make_tiny_<name>(out_dir)`` that writes ``out_dir/<name>/``
(a directory that loads exactly like the real model's hub snapshot) and returns its
path; ``MODELS`` lists them and ``main`` runs them. A directory already built by the
same builder version is left alone (idempotent); ``--force`` rebuilds. Directories are
built beside the target and renamed into place, so a reader never sees half of one.

birefnet/, rmbg-2.0/
    Laid out like ``ZhengPeng7/BiRefNet`` / ``briaai/RMBG-2.0``: ``config.json`` with an
    ``auto_map`` to the repo's own code (``BiRefNet_config.py``, ``birefnet.py``, ours),
    weights in ``model.safetensors``; loaded by ``deployments.remote_code``. The code is
    built like the published code, quirks included (a plain ``Config`` replacing
    ``self.config``, no ``post_init()``, a float32 window mask that breaks half precision
    in ``rmbg-2.0/``): see ``TINY_BIREFNET_SOURCE`` for those and for the hand-set
    weights that make its output known (red-ish = foreground). It is fully
    convolutional, so it runs at any input size; it has no size of its own. The engine
    still defaults to the real model's 1024x1024: tests and configs/test.yaml pass a
    small ``input_size`` (e.g. 64) to keep CPU runs fast. Needs einops and kornia, as the
    published code does.

qwen-image-layered/
    Loads like ``Qwen/Qwen-Image-Layered``: ``QwenImageLayeredPipeline.from_pretrained(dir)``
    (diffusers layout: ``model_index.json`` plus one folder per component). Every
    component has the real one's class and wiring, only tiny and randomly initialised
    (fixed seed): an MMDiT with ``use_layer3d_rope`` and ``use_additional_t_cond``, an
    RGBA VAE (``input_channels=4``) with the real one's three downsampling stages, a
    Qwen2.5-VL text encoder and a byte-level Qwen2 tokenizer built here (no download).
    Its layers are noise-like: it checks plumbing (loading, call arguments, progress,
    cancellation, seeds, output shapes), not quality. ``processor`` is saved as None
    (``Qwen2VLProcessor`` needs torchvision), so the pipeline cannot caption an image:
    always pass a prompt to it. Needs ``diffusers`` (built and tested with 0.42.1);
    without it, building all models skips this one.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable

DEFAULT_OUT = Path("models/tiny")
STAMP = ".strata-tiny-model.json"

# The remote code of the tiny BiRefNet, in the published repos' layout: a config module
# and a model module, written into the model directory, which is what transformers
# imports (into HF_MODULES_CACHE) as the repo's own code.
TINY_BIREFNET_CONFIG_SOURCE = '''\
"""The config class of the tiny BiRefNet stand-in (Strata test fixture)."""

from transformers import PretrainedConfig


class BiRefNetConfig(PretrainedConfig):
    model_type = "strata_tiny_birefnet"

    def __init__(self, bb_pretrained=False, **kwargs):
        self.bb_pretrained = bb_pretrained
        super().__init__(**kwargs)
'''

TINY_BIREFNET_SOURCE = '''\
"""Tiny stand-in for the published BiRefNet / RMBG-2.0 code (Strata test fixture, not a real model).

Same interface as their code: ``model(x)`` with ``x`` of shape (B, 3, H, W), RGB / 255
normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225),
returns a list of logit maps, coarse to fine; the last one is (B, 1, H, W) at full
resolution. Any H and W work (fully convolutional).

Built like the published code, not like a model written for transformers, so that it
fails where theirs fails:

- ``__init__(bb_pretrained=True, config=BiRefNetConfig())`` replaces ``self.config``
  with a plain ``Config`` object holding the architecture, and never calls
  ``post_init()`` (transformers 5's from_pretrained cannot load such a model);
- a shifted-window attention whose window mask is built in float32 in the forward;
  with ``MASK_FOLLOWS_DTYPE = False`` (RMBG-2.0's copy) every half-precision forward
  fails on it, with True (BiRefNet since upstream's fix) the mask follows the scores;
- it imports einops and kornia like the published code. Not timm and torchvision:
  timm imports torchvision, and no torchvision can import beside a CPU torch that
  did not come from torchvision's own index; so the published code's deformable
  convolution (torchvision's deform_conv2d, no bfloat16 kernel) is not here, and
  bfloat16 is refused for the BiRefNet family by rule.

Its output is known: the attention's output projection is zero, so it adds exactly
nothing, and the rest is set by hand. On 0..255 RGB:

    logit = (R - (G + B) / 2 - 64) / 4,   then averaged over a 3x3 neighbourhood

so a pixel is foreground (sigmoid > 0.5) when its red exceeds the mean of green and
blue by more than 64: red, orange, magenta-ish pixels are foreground; grey, white,
black, blue, green, cyan pixels are background. Examples: (220, 30, 30) -> logit
+31.5 (mask 255); grey (128, 128, 128) -> -16 (mask 0); (160, 96, 96) -> 0 (mask 128).
The coarser maps are 4x and 2x average-pooled copies of the last one.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from kornia.filters import laplacian  # noqa: F401 - imported as the published code imports it
from torch import nn
from transformers import PreTrainedModel

from .BiRefNet_config import BiRefNetConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_FOLLOWS_DTYPE = {mask_follows_dtype}


class Config:
    """The architecture, as a plain object (the published code keeps it so)."""

    def __init__(self):
        self.red_margin = 64.0
        self.logit_scale = 0.25
        self.smooth_kernel = 3
        self.window_size = 4
        self.attention_dim = 4
        self.drop_path_rate = 0.1


class WindowAttention(nn.Module):
    """Shifted-window self-attention over (B, C, H, W), Swin's way, scores masked per window."""

    def __init__(self, channels, dim, window):
        super().__init__()
        self.window = window
        self.qkv = nn.Linear(channels, 3 * dim)
        self.proj = nn.Linear(dim, 1)

    def forward(self, x):
        w = self.window
        b, _, h, width = x.shape
        x = F.pad(x, (0, -width % w, 0, -h % w))
        hp, wp = x.shape[-2:]
        shift = w // 2
        x = torch.roll(x, (-shift, -shift), dims=(2, 3))
        tokens = rearrange(x, "b c (nh wh) (nw ww) -> (b nh nw) (wh ww) c", wh=w, ww=w)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        mask = self._shift_mask(hp, wp, shift, x.device).repeat(b, 1, 1)  # float32, as published
        scores = scores + (mask.to(scores.dtype) if MASK_FOLLOWS_DTYPE else mask)
        out = self.proj(scores.softmax(dim=-1) @ v)
        out = rearrange(out, "(b nh nw) (wh ww) c -> b c (nh wh) (nw ww)", b=b, nh=hp // w, wh=w, ww=w)
        return torch.roll(out, (shift, shift), dims=(2, 3))[:, :, :h, :width]

    def _shift_mask(self, hp, wp, shift, device):
        w = self.window
        regions = torch.zeros((1, 1, hp, wp), device=device)
        label = 0
        for rows in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            for cols in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
                regions[:, :, rows, cols] = label
                label += 1
        windows = rearrange(regions, "b c (nh wh) (nw ww) -> (b nh nw) (wh ww c)", wh=w, ww=w)
        differ = windows.unsqueeze(1) != windows.unsqueeze(2)
        return torch.zeros(differ.shape, device=device).masked_fill(differ, -100.0)


class BiRefNet(PreTrainedModel):
    config_class = BiRefNetConfig

    def __init__(self, bb_pretrained=True, config=BiRefNetConfig()):
        super().__init__(config)
        self.config = Config()
        c = self.config
        # Like the real model's Swin backbone: a drop-path schedule read with .item().
        self.drop_path_rates = [x.item() for x in torch.linspace(0, c.drop_path_rate, 4)]
        k = c.smooth_kernel
        self.denorm = nn.Conv2d(3, 3, 1)
        self.redness = nn.Conv2d(3, 1, 1)
        self.smooth = nn.Conv2d(1, 1, k, bias=False)  # its weights; applied (padded) in _smooth
        self.attention = WindowAttention(3, c.attention_dim, c.window_size)
        self._set_known_weights()

    @torch.no_grad()
    def _set_known_weights(self):
        c = self.config
        std = torch.tensor(IMAGENET_STD) * 255.0
        mean = torch.tensor(IMAGENET_MEAN) * 255.0
        self.denorm.weight.copy_(torch.diag(std).reshape(3, 3, 1, 1))
        self.denorm.bias.copy_(mean)
        s = c.logit_scale
        self.redness.weight.copy_(torch.tensor([s, -s / 2, -s / 2]).reshape(1, 3, 1, 1))
        self.redness.bias.fill_(-s * c.red_margin)
        k = c.smooth_kernel
        self.smooth.weight.fill_(1.0 / (k * k))
        self.attention.proj.weight.zero_()
        self.attention.proj.bias.zero_()

    def forward(self, x):
        logits = self._smooth(self.redness(self.denorm(x))) + self.attention(x)
        return [F.avg_pool2d(logits, 4), F.avg_pool2d(logits, 2), logits]

    def _smooth(self, logits):
        # The same filter on every image, run as one depthwise conv over the batch
        # folded into channels: CPU convolution (oneDNN) is 5-15x slower per image on a
        # 1-channel conv with batch > 1 than on batch 1, and that would make batching
        # look costly where it is not (a real BiRefNet has no such layer).
        b, _, h, w = logits.shape
        k = self.config.smooth_kernel
        padded = F.pad(logits, (k // 2,) * 4, mode="replicate").reshape(1, b, h + k - 1, w + k - 1)
        weight = self.smooth.weight.expand(b, 1, k, k)
        return F.conv2d(padded, weight, groups=b).reshape(b, 1, h, w)
'''

BIREFNET_BUILDER_VERSION = 2
# tiny model -> whether its window mask follows the scores' dtype (TINY_BIREFNET_SOURCE).
BIREFNET_FAMILY = {"birefnet": True, "rmbg-2.0": False}


def _birefnet_source(name: str) -> str:
    return TINY_BIREFNET_SOURCE.replace("{mask_follows_dtype}", str(BIREFNET_FAMILY[name]))


def _stamp(builder: str, version: int, source: str) -> dict:
    return {
        "builder": builder,
        "version": version,
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
    }


def _is_current(target: Path, stamp: dict) -> bool:
    try:
        return json.loads((target / STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``, replacing what was there."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _import_package_module(directory: Path, module: str):
    """``directory/<module>.py`` imported as a module of a package holding the
    directory's files, so that its relative imports work (as in transformers' copy)."""
    package = f"_strata_tiny_{uuid.uuid4().hex}"
    with tempfile.TemporaryDirectory() as root:
        shutil.copytree(directory, Path(root) / package, ignore=shutil.ignore_patterns(".*"))
        (Path(root) / package / "__init__.py").touch()
        sys.path.insert(0, root)
        try:
            return importlib.import_module(f"{package}.{module}")
        finally:
            sys.path.remove(root)


def _make_tiny_birefnet_family(name: str, out_dir: str | os.PathLike, force: bool) -> Path:
    """Write ``out_dir/<name>/`` as the published repos are laid out: config.json with
    its auto_map, BiRefNet_config.py, birefnet.py and model.safetensors (a plain state
    dict, as their code has no save_pretrained of its own to speak of)."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    target = out_dir / name
    source = _birefnet_source(name)
    stamp = _stamp(name, BIREFNET_BUILDER_VERSION, TINY_BIREFNET_CONFIG_SOURCE + source)
    if not force and _is_current(target, stamp):
        return target

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_dir))
    try:
        (staging / "BiRefNet_config.py").write_text(TINY_BIREFNET_CONFIG_SOURCE)
        (staging / "birefnet.py").write_text(source)
        auto_map = {"AutoConfig": "BiRefNet_config.BiRefNetConfig",
                    "AutoModelForImageSegmentation": "birefnet.BiRefNet"}
        config = {"architectures": ["BiRefNet"], "auto_map": auto_map, "bb_pretrained": False}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        module = _import_package_module(staging, "birefnet")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the attention's random weights: the same files every build
            model = module.BiRefNet(config=module.BiRefNetConfig(**config)).eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, staging / "model.safetensors")
        (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        # mkdtemp makes 0700 (and safetensors 0600): make it readable like any model dir.
        staging.chmod(0o755)
        for f in staging.iterdir():
            f.chmod(0o644)
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def make_tiny_birefnet(out_dir: str | os.PathLike = DEFAULT_OUT, *, force: bool = False) -> Path:
    """Write ``out_dir/birefnet/``: a tiny stand-in for BiRefNet's published code; returns its path."""
    return _make_tiny_birefnet_family("birefnet", out_dir, force)


def make_tiny_rmbg(out_dir: str | os.PathLike = DEFAULT_OUT, *, force: bool = False) -> Path:
    """Write ``out_dir/rmbg-2.0/``: the same with RMBG-2.0's float32 window mask; returns its path."""
    return _make_tiny_birefnet_family("rmbg-2.0", out_dir, force)


# --------------------------------------------------------------------------- qwen-image-layered

QWEN_LAYERED_BUILDER_VERSION = 1
QWEN_LAYERED_SEED = 0

# Qwen2's special tokens, in the real tokenizer's order (there from id 151643 on; here
# right after the 256 byte tokens). The pipeline's prompt templates use <|im_start|>,
# <|im_end|> and the vision ones.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Text width shared by the text encoder (hidden_size) and the MMDiT (joint_attention_dim).
_QWEN_TEXT_DIM = 16
# z_dim must not be 4 (the RGBA input's channel count: the pipeline would take the
# image for latents); the MMDiT sees 2x2 patches of it: in_channels = 4 * z_dim, and
# out_channels = z_dim (it predicts 4 * out_channels per patch).
_QWEN_Z_DIM = 8

QWEN_LAYERED_CONFIG = {
    "transformer": dict(
        patch_size=2,
        in_channels=4 * _QWEN_Z_DIM,
        out_channels=_QWEN_Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_QWEN_TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=[8, 4, 4],  # sums to attention_head_dim
        use_layer3d_rope=True,
        use_additional_t_cond=True,
    ),
    "vae": dict(
        base_dim=8,
        z_dim=_QWEN_Z_DIM,
        dim_mult=[1, 2, 4, 4],  # three downsampling stages, as the real VAE (x8)
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        input_channels=4,  # RGBA
        latents_mean=[0.0] * _QWEN_Z_DIM,
        latents_std=[1.0] * _QWEN_Z_DIM,
    ),
    "scheduler": dict(
        # The real model's scheduler settings (dynamic shifting, exponential).
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    ),
    "text_config": dict(
        hidden_size=_QWEN_TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        # head_dim 8: the mrope sections cover its 4 rotary frequencies.
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": [1, 1, 2]},
    ),
    "vision_config": dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=_QWEN_TEXT_DIM,
        fullatt_block_indexes=[1],
        window_size=112,
    ),
}


def _byte_level_vocab() -> dict[str, int]:
    """GPT-2 / Qwen2 byte-level alphabet: each of the 256 bytes as one printable
    character (the mapping ``bytes_to_unicode`` of GPT-2), as a BPE vocabulary with no
    merges, so any text tokenizes to one token per UTF-8 byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = {}
    extra = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {chars[b]: b for b in range(256)}


def _tiny_qwen_tokenizer():
    """A Qwen2Tokenizer built here: byte-level vocabulary, no merges, Qwen2's special
    tokens (transformers 5 builds it from ``vocab=`` and ``merges=`` directly)."""
    from transformers import Qwen2Tokenizer

    vocab = _byte_level_vocab()
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    extra = [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"]
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          extra_special_tokens=extra, model_max_length=32768)


def _qwen_layered_source() -> str:
    """What the built directory depends on (for the stamp): the configs, the tokens."""
    return json.dumps({"config": QWEN_LAYERED_CONFIG, "special_tokens": QWEN_SPECIAL_TOKENS,
                       "seed": QWEN_LAYERED_SEED}, sort_keys=True)


def _build_tiny_qwen_layered_pipeline():
    """The tiny QwenImageLayeredPipeline, in memory (random weights, fixed seed)."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                           QwenImageLayeredPipeline, QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = QWEN_LAYERED_CONFIG
    tokenizer = _tiny_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text_config = dict(cfg["text_config"], vocab_size=len(tokenizer),
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"])
    te_config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(cfg["vision_config"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    # Own RNG state: building does not disturb the caller's torch.manual_seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(QWEN_LAYERED_SEED)
        transformer = QwenImageTransformer2DModel(**cfg["transformer"]).eval()
        torch.manual_seed(QWEN_LAYERED_SEED + 1)
        vae = AutoencoderKLQwenImage(**cfg["vae"]).eval()
        torch.manual_seed(QWEN_LAYERED_SEED + 2)
        text_encoder = Qwen2_5_VLForConditionalGeneration(te_config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    return QwenImageLayeredPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        processor=None,  # Qwen2VLProcessor needs torchvision: no captioning in the tiny one
        transformer=transformer,
    )


def make_tiny_qwen_image_layered(out_dir: str | os.PathLike = DEFAULT_OUT, *,
                                 force: bool = False) -> Path:
    """Write ``out_dir/qwen-image-layered/``: a tiny QwenImageLayeredPipeline; returns its path."""
    out_dir = Path(out_dir)
    target = out_dir / "qwen-image-layered"
    stamp = _stamp("qwen-image-layered", QWEN_LAYERED_BUILDER_VERSION, _qwen_layered_source())
    if not force and _is_current(target, stamp):
        return target

    pipe = _build_tiny_qwen_layered_pipeline()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".qwen-image-layered.partial-", dir=out_dir))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# name -> builder
MODELS: dict[str, Callable[..., Path]] = {
    "birefnet": make_tiny_birefnet,
    "rmbg-2.0": make_tiny_rmbg,
    "qwen-image-layered": make_tiny_qwen_image_layered,
}
# name -> Python packages its builder needs beyond torch and transformers. Building
# "all" skips (with a note) a model whose packages are missing; --only NAME fails.
REQUIRES: dict[str, tuple[str, ...]] = {
    "birefnet": ("einops", "kornia"),
    "rmbg-2.0": ("einops", "kornia"),
    "qwen-image-layered": ("diffusers",),
}


def _missing(name: str) -> list[str]:
    return [pkg for pkg in REQUIRES.get(name, ()) if importlib.util.find_spec(pkg) is None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--only", action="append", choices=sorted(MODELS),
                        help="build only this model (repeatable); default all")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    for name in args.only or list(MODELS):
        missing = _missing(name)
        if missing and not args.only:
            print(f"{name}: skipped ({', '.join(missing)} not installed)")
            continue
        path = MODELS[name](args.out, force=args.force)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"{name}: {path} ({size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
