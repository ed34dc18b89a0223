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

Room is left for ``make_tiny_qwen_image_layered`` (a tiny QwenImageLayeredPipeline, see
DESIGN.md section 2): add the function and a ``MODELS`` entry.
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
        self.smooth = nn.Conv2d(1, 1, k, padding=k // 2, padding_mode="replicate", bias=False)
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
        logits = self.smooth(self.redness(self.denorm(x)))
        return [F.avg_pool2d(logits, 4), F.avg_pool2d(logits, 2), logits]
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


# name -> builder; make_tiny_qwen_image_layered goes here when it exists.
MODELS: dict[str, Callable[..., Path]] = {
    "birefnet": make_tiny_birefnet,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--only", action="append", choices=sorted(MODELS),
                        help="build only this model (repeatable); default all")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    for name in args.only or list(MODELS):
        path = MODELS[name](args.out, force=args.force)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"{name}: {path} ({size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
