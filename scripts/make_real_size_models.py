#!/usr/bin/env python
"""Real-size stand-ins for the real models, built offline: their architecture and size,
random weights. For cost (time, memory, dtype, compile), not for quality.

    python scripts/make_real_size_models.py                 # models/real-size/{birefnet,birefnet_lite}/
    python scripts/make_real_size_models.py --out DIR --only birefnet_lite [--force]
    python scripts/make_real_size_models.py --qwen-report   # Qwen-Image-Layered at real size, on meta

Deterministic (fixed seed) and idempotent like scripts/make_tiny_models.py: a directory
already built by the same builder version from the same code is left alone; ``--force``
rebuilds; directories are built beside the target and renamed into place. The full one
takes about 880 MB of disk and ~10 s here; the lite one about 180 MB.

birefnet/ (BiRefNet-class: BiRefNet, RMBG-2.0) and birefnet_lite/ (BiRefNet_lite-class)
    Laid out as the published hub repos are (``ZhengPeng7/BiRefNet``,
    ``ZhengPeng7/BiRefNet_lite``, ``briaai/RMBG-2.0``): ``config.json`` with the
    ``auto_map`` {AutoConfig: BiRefNet_config.BiRefNetConfig,
    AutoModelForImageSegmentation: birefnet.BiRefNet} and ``bb_pretrained: false``,
    the code (``BiRefNet_config.py``, ``birefnet.py``: ours, written from the papers,
    see scripts/real_size_birefnet/), and ``model.safetensors`` written with
    ``safetensors.torch.save_file(model.state_dict())``, not ``save_pretrained``. The code
    has the published code's quirks (``self.config`` replaced by a plain ``Config``, no
    ``post_init()``), so transformers 5's from_pretrained fails on it as on the real
    repos, and it loads through ``deployments.remote_code`` as they do. Needs einops and
    kornia (the published code's imports); timm is not used (see below).

    What is the same as the real model: the Swin-L backbone (embed 192, depths 2-2-18-2,
    heads 6-12-24-48, window 12: swin_large_patch4_window12_384's geometry) or Swin-T
    (96, 2-2-6-2, 3-6-12-24, window 7); the backbone run on the image and on its half-size
    copy, the stages' maps concatenated; the three shallower stages concatenated onto the
    deepest and squeezed by a decoder block; the decoder's lateral 1x1 blocks, decoder
    blocks (3x3, deformable ASPP with 1x1 + 1/3/7 branches and global pooling, 3x3), image
    patches fed in at every scale, gradient-attention gates, multi-scale supervision
    heads, BatchNorm; 220.2M parameters for the full one (published: ~220M), 44.3M for
    the lite one; fp32 safetensors; the same input contract (1024x1024, ImageNet
    normalisation) and output (a list of logit maps, the last (B, 1, H, W)).

    How it differs from the real model, as far as public facts tell:
    - Its weights are random (seed 0): masks mean nothing; cost does not depend on values.
    - Its code is ours, not the published code: the same operators and shapes, but module
      and state-dict names differ, so the real checkpoints do not load into it (nor its
      weights into the real code).
    - The Swin backbone is our own code, not timm's (timm cannot import here: it imports
      torchvision). The published code has its own Swin too and takes only small helpers
      from timm; ours does not import timm at all.
    - Deformable convolutions run torchvision's deform_conv2d only when torchvision
      imports; otherwise a plain convolution of the same shape, offsets computed but
      unused (exact for these weights, whose offset convolutions are zero, as the real
      block is initialised). Faster than deform_conv2d, and runs in bfloat16 where
      deform_conv2d has none: CPU timings here are a little optimistic for the decoder.
    - Window attention always uses torch's scaled_dot_product_attention and its mask
      follows the scores' dtype (BiRefNet's current code; RMBG-2.0's copy keeps a float32
      mask and fails in half precision: the tiny rmbg-2.0 stand-in models that).
    - Details that change no cost are simplified (no classification head, no training
      losses; relative-position index as a non-persistent buffer).

Qwen-Image-Layered (``--qwen-report``)
    ``qwen_layered_configs()`` are the real pipeline's component configs, from the
    published ones (Qwen-Image's MMDiT with the layered model's 3D-layer RoPE and extra
    timestep condition; the RGBA VAE; Qwen2.5-VL-7B-Instruct; the scheduler), and
    ``build_qwen_layered_on_meta()`` constructs them on the meta device (no memory, no
    weights) under the installed diffusers/transformers and wires them into a
    ``QwenImageLayeredPipeline``. The report gives parameters and bfloat16 memory per
    component. Nothing of it is written to disk (~58 GB).
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
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import make_tiny_models  # noqa: E402 - scripts/ is not a package: its helpers, from beside this file

DEFAULT_OUT = Path("models/real-size")
STAMP = ".strata-real-size-model.json"
SOURCE_DIR = SCRIPTS / "real_size_birefnet"
BUILDER_VERSION = 1
SEED = 0
# directory name -> the backbone its code is built with (the model module's BACKBONE)
BIREFNET_VARIANTS = {"birefnet": "swin_v1_l", "birefnet_lite": "swin_v1_t"}
_BACKBONE_LINE = 'BACKBONE = "swin_v1_l"'
AUTO_MAP = {"AutoConfig": "BiRefNet_config.BiRefNetConfig", "AutoModelForImageSegmentation": "birefnet.BiRefNet"}


def birefnet_sources(variant: str) -> dict[str, str]:
    """The remote-code files of ``variant`` (file name -> text), as written into its directory."""
    backbone = BIREFNET_VARIANTS[variant]
    model = (SOURCE_DIR / "birefnet.py").read_text()
    if model.count(_BACKBONE_LINE) != 1:
        raise RuntimeError(f"{SOURCE_DIR / 'birefnet.py'} must set {_BACKBONE_LINE} exactly once")
    return {
        "BiRefNet_config.py": (SOURCE_DIR / "BiRefNet_config.py").read_text(),
        "birefnet.py": model.replace(_BACKBONE_LINE, f'BACKBONE = "{backbone}"'),
    }


def _stamp(variant: str, sources: dict[str, str]) -> dict:
    digest = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()
    return {"builder": f"real-size {variant}", "version": BUILDER_VERSION, "seed": SEED, "source_sha256": digest}


def _is_current(target: Path, stamp: dict) -> bool:
    try:
        return json.loads((target / STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def build_birefnet(variant: str = "birefnet", device: str = "cpu"):
    """The ``variant`` model in memory, from the code its directory gets (seed ``SEED``,
    float32, eval mode): what ``make_real_size_birefnet`` saves."""
    import torch

    staging = Path(tempfile.mkdtemp(prefix=f".{variant}-code-"))
    try:
        for name, text in birefnet_sources(variant).items():
            (staging / name).write_text(text)
        module = make_tiny_models._import_package_module(staging, "birefnet")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):  # building does not disturb the caller's seed
        torch.manual_seed(SEED)
        with torch.device(device):
            model = module.BiRefNet(config=module.BiRefNetConfig(bb_pretrained=False))
    return model.eval()


def make_real_size_birefnet(out_dir: str | os.PathLike = DEFAULT_OUT, variant: str = "birefnet", *,
                            force: bool = False) -> Path:
    """Write ``out_dir/<variant>/`` (``birefnet`` or ``birefnet_lite``) in the published
    repos' layout; returns its path. Left alone when already built from the same code."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    target = out_dir / variant
    sources = birefnet_sources(variant)
    stamp = _stamp(variant, sources)
    if not force and _is_current(target, stamp):
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{variant}.partial-", dir=out_dir))
    try:
        for name, text in sources.items():
            (staging / name).write_text(text)
        config = {"architectures": ["BiRefNet"], "auto_map": AUTO_MAP, "bb_pretrained": False}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model = build_birefnet(variant)
        # A plain state dict, as the published repos' weights are (their code has no
        # save_pretrained of its own to speak of).
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, staging / "model.safetensors")
        del model
        (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes 0700 (and safetensors 0600)
        for f in staging.iterdir():
            f.chmod(0o644)
        make_tiny_models._replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def count_parameters(model) -> int:
    """Parameters of ``model`` (a torch module, on any device, meta included)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- Qwen-Image-Layered

# Qwen2.5-VL-7B-Instruct's special-token ids (its tokenizer's; from id 151643 on).
_QWEN_TOKEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
_QWEN_TEXT_DIM = 3584  # the text encoder's hidden size = the MMDiT's joint_attention_dim


def qwen_layered_configs() -> dict[str, dict]:
    """The real Qwen-Image-Layered pipeline's component configs (constructor kwargs).

    From the published configs: the MMDiT is Qwen-Image's (60 layers, 24 heads x 128,
    joint_attention_dim 3584, patch 2, 16 latent channels) with the layered model's
    ``use_layer3d_rope`` and ``use_additional_t_cond``; the VAE is Qwen-Image's
    (base_dim 96, z_dim 16, dim_mult 1-2-4-4, two res blocks) taking RGBA
    (``input_channels=4``); the text encoder is Qwen2.5-VL-7B-Instruct; the scheduler
    as the tiny builder sets it (dynamic shifting, exponential).
    """
    return {
        "transformer": dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=_QWEN_TEXT_DIM, guidance_embeds=False,
            axes_dims_rope=(16, 56, 56), use_layer3d_rope=True, use_additional_t_cond=True,
        ),
        "vae": dict(
            base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True], dropout=0.0, input_channels=4,
        ),
        "text_encoder": dict(
            text_config=dict(
                vocab_size=152064, hidden_size=_QWEN_TEXT_DIM, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
                rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                **_QWEN_TOKEN_IDS,
            ),
            vision_config=dict(
                depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=_QWEN_TEXT_DIM,
                fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu",
            ),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
            vision_end_token_id=151653, tie_word_embeddings=False,
        ),
        "scheduler": dict(make_tiny_models.QWEN_LAYERED_CONFIG["scheduler"]),
    }


def build_qwen_layered_on_meta(configs: dict[str, dict] | None = None):
    """A ``QwenImageLayeredPipeline`` of real-size components on the meta device (shapes,
    no memory): transformer, VAE and text encoder from ``qwen_layered_configs()``, the
    tiny builder's byte-level tokenizer (a tokenizer holds no weights) and no processor
    (Qwen2VLProcessor needs torchvision)."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = configs or qwen_layered_configs()
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**cfg["transformer"])
        vae = AutoencoderKLQwenImage(**cfg["vae"])
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg["text_encoder"]))
    return QwenImageLayeredPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]), vae=vae, text_encoder=text_encoder,
        tokenizer=make_tiny_models._tiny_qwen_tokenizer(), processor=None, transformer=transformer,
    )


def qwen_layered_report(pipe=None) -> dict:
    """Parameters and bfloat16 weight memory of each component of the real-size pipeline."""
    import diffusers
    import transformers

    pipe = pipe if pipe is not None else build_qwen_layered_on_meta()
    components = {}
    for name in ("transformer", "text_encoder", "vae"):
        params = count_parameters(getattr(pipe, name))
        components[name] = {"class": type(getattr(pipe, name)).__name__, "parameters": params,
                            "bf16_gib": params * 2 / 2 ** 30}
    total = sum(c["parameters"] for c in components.values())
    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "components": components, "total_parameters": total, "total_bf16_gib": total * 2 / 2 ** 30}


def _print_qwen_report(report: dict) -> None:
    print(f"Qwen-Image-Layered at real size, on meta (diffusers {report['diffusers']}, "
          f"transformers {report['transformers']})")
    print(f"  {'component':<14}{'class':<38}{'parameters':>16}{'bf16 GiB':>10}")
    for name, c in report["components"].items():
        print(f"  {name:<14}{c['class']:<38}{c['parameters']:>16,}{c['bf16_gib']:>10.2f}")
    print(f"  {'total':<52}{report['total_parameters']:>16,}{report['total_bf16_gib']:>10.2f}")


# --------------------------------------------------------------------------- command line

REQUIRES = ("einops", "kornia", "safetensors")


def main(argv: list[str] | None = None) -> int:
    """Build the BiRefNet-class stand-ins (or, with --qwen-report, report the Qwen sizes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--only", action="append", choices=sorted(BIREFNET_VARIANTS),
                        help="build only this model (repeatable); default all")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--qwen-report", action="store_true",
                        help="build Qwen-Image-Layered's real-size components on meta and print their sizes (writes nothing)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="--qwen-report: also write the report here")
    args = parser.parse_args(argv)
    if args.qwen_report:
        report = qwen_layered_report()
        _print_qwen_report(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    missing = [name for name in REQUIRES if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"needs {', '.join(missing)}: pip install -e '.[models]'")
    for variant in args.only or list(BIREFNET_VARIANTS):
        path = make_real_size_birefnet(args.out, variant, force=args.force)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"{variant}: {path} ({size / 2 ** 20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
