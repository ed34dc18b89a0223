#!/usr/bin/env python
"""Write tiny stand-ins for the real models, offline, so tests run the real loading code.

    python scripts/make_tiny_models.py [--out models/tiny] [--force] [--only birefnet]

Each model is one function ``make_tiny_<name>(out_dir)`` that writes ``out_dir/<name>/``
(a directory that loads exactly like the real model's hub snapshot) and returns its
path; ``MODELS`` lists them and ``main`` runs them. A directory already built by the
same builder version is left alone (idempotent); ``--force`` rebuilds. Directories are
built beside the target and renamed into place, so a reader never sees half of one.

birefnet/
    Loads like ``ZhengPeng7/BiRefNet`` / ``briaai/RMBG-2.0``:
    ``AutoModelForImageSegmentation.from_pretrained(dir, trust_remote_code=True)``.
    ``config.json`` carries ``auto_map`` to our own remote-code module
    ``tiny_birefnet.py`` (copied into the directory), weights are ``model.safetensors``.
    The weights are set by hand, not trained or random, so its output is known:
    see ``TINY_BIREFNET_SOURCE`` below for the rule (red-ish = foreground). It is fully
    convolutional, so it runs at any input size; it has no size of its own. The engine
    still defaults to the real model's 1024x1024: tests and configs/test.yaml pass a
    small ``input_size`` (e.g. 64) to keep CPU runs fast.

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

# The remote code of the tiny BiRefNet. It is written into the model directory, which
# is what transformers imports (into HF_MODULES_CACHE) when trust_remote_code=True.
TINY_BIREFNET_SOURCE = '''\
"""Tiny BiRefNet-interface segmentation model (Strata test fixture, not a real model).

Same interface as BiRefNet's remote code: ``model(x)`` with ``x`` of shape (B, 3, H, W),
RGB / 255 normalised with the ImageNet mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225), returns a list of logit maps, coarse to fine; the last one is
(B, 1, H, W) at full resolution. Any H and W work (fully convolutional).

Its weights are set by hand so that the output is known. On 0..255 RGB:

    logit = (R - (G + B) / 2 - 64) / 4,   then averaged over a 3x3 neighbourhood

so a pixel is foreground (sigmoid > 0.5) when its red exceeds the mean of green and
blue by more than 64: red, orange, magenta-ish pixels are foreground; grey, white,
black, blue, green, cyan pixels are background. Examples: (220, 30, 30) -> logit
+31.5 (mask 255); grey (128, 128, 128) -> -16 (mask 0); (160, 96, 96) -> 0 (mask 128).
The coarser maps are 4x and 2x average-pooled copies of the last one.

Layers: ``denorm`` (1x1 conv: undo the normalisation, back to 0..255), ``redness``
(1x1 conv: the rule above), ``smooth`` (3x3 box filter, replicate padding).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyBiRefNetConfig(PretrainedConfig):
    model_type = "tiny_birefnet"

    def __init__(self, red_margin=64.0, logit_scale=0.25, smooth_kernel=3, drop_path_rate=0.1,
                 **kwargs):
        self.red_margin = red_margin
        self.logit_scale = logit_scale
        self.smooth_kernel = smooth_kernel
        self.drop_path_rate = drop_path_rate
        super().__init__(**kwargs)


class TinyBiRefNet(PreTrainedModel):
    config_class = TinyBiRefNetConfig
    base_model_prefix = "tiny_birefnet"
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        # Like the real model's Swin backbone: a drop-path schedule read with .item()
        # while constructing, which transformers 5 must survive (it builds on "meta").
        self.drop_path_rates = [x.item() for x in torch.linspace(0, config.drop_path_rate, 4)]
        k = config.smooth_kernel
        self.denorm = nn.Conv2d(3, 3, 1)
        self.redness = nn.Conv2d(3, 1, 1)
        self.smooth = nn.Conv2d(1, 1, k, bias=False)  # its weights; applied (padded) in _smooth
        self._set_known_weights()
        self.post_init()

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

    def _init_weights(self, module):
        # Every weight comes from model.safetensors (or _set_known_weights): never
        # re-initialise randomly.
        pass

    def forward(self, x):
        logits = self._smooth(self.redness(self.denorm(x)))
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

BIREFNET_BUILDER_VERSION = 1


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


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_birefnet(out_dir: str | os.PathLike = DEFAULT_OUT, *, force: bool = False) -> Path:
    """Write ``out_dir/birefnet/``: a tiny BiRefNet-interface model; returns its path."""
    out_dir = Path(out_dir)
    target = out_dir / "birefnet"
    stamp = _stamp("birefnet", BIREFNET_BUILDER_VERSION, TINY_BIREFNET_SOURCE)
    if not force and _is_current(target, stamp):
        return target

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".birefnet.partial-", dir=out_dir))
    try:
        source_file = staging / "tiny_birefnet.py"
        source_file.write_text(TINY_BIREFNET_SOURCE)
        module = _import_file(source_file, f"_strata_tiny_birefnet_{uuid.uuid4().hex}")
        config = module.TinyBiRefNetConfig(
            auto_map={
                "AutoConfig": "tiny_birefnet.TinyBiRefNetConfig",
                "AutoModelForImageSegmentation": "tiny_birefnet.TinyBiRefNet",
            },
        )
        model = module.TinyBiRefNet(config).eval()
        model.save_pretrained(staging, safe_serialization=True)
        # Remote code is referenced by auto_map; make sure save_pretrained left ours.
        if not source_file.exists():
            source_file.write_text(TINY_BIREFNET_SOURCE)
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
    "qwen-image-layered": make_tiny_qwen_image_layered,
}
# name -> Python packages its builder needs beyond torch and transformers. Building
# "all" skips (with a note) a model whose packages are missing; --only NAME fails.
REQUIRES: dict[str, tuple[str, ...]] = {
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
