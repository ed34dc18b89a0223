"""The BiRefNet-family engine: BiRefNet, its variants, RMBG-2.0 (same architecture).

Plain Python (no Ray, no HTTP); torch and transformers are imported in ``load`` and
``predict``, so importing this module is cheap and torch-free.

What the real models want (DESIGN.md section 2): RGB at a fixed square size (1024 for
BiRefNet and RMBG-2.0, 2048 for BiRefNet_HR; aspect not kept), /255, ImageNet mean and
std; ``model(x)`` returns a list of logit maps, the last at full resolution; its
sigmoid is the mask. No min-max stretch: a picture with no foreground gets an empty
mask, not its noise amplified to 255. The repos' own code is loaded by
``deployments.remote_code`` (which says why not by ``from_pretrained``).

Precision, from what the published code runs (``FAMILIES``): BiRefNet's decoder uses
torchvision's ``deform_conv2d``, which has no bfloat16 kernel (CPU or CUDA), so
BiRefNet runs in float16 on a GPU (its authors' own figures are fp16), never bfloat16.
RMBG-2.0's copy of the code adds a float32 window mask to the attention scores, which
breaks any half-precision forward (BiRefNet's code fixed it upstream, RMBG-2.0's did
not), so RMBG-2.0 runs under autocast on a GPU (float32 weights; autocast runs each op
in the precision it supports). Both run in float32 on the CPU.

The caller (the ingress) shrinks larger images to ``info.input_size`` and resizes the
mask back to the original size; smaller images come as they are. An image of another
size is resized in here and its mask resized back (bilinearly), so ``predict`` always
answers masks the size of its images.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import numpy as np

from .engine import EngineInfo, SegmentationEngine
from .remote_code import load_remote_model
from .weights import WeightsUnavailable, canonical_dtype, dtype_name, load_pretrained, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What a hub snapshot of a BiRefNet repo needs: config, remote code, safetensors.
# RMBG-2.0 also ships ONNX exports and a pickled copy of the weights (~2 GB we skip);
# pickled weights are never loaded (safetensors only).
HUB_IGNORE_PATTERNS = (
    "*.onnx", "onnx/*", "*.bin", "*.pth", "*.pt", "*.ckpt", "*.h5", "*.msgpack",
    "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", "*.mp4",
)
PIP_HINT = ("pip install -e '.[remote-code]' (torchvision, timm, kornia, einops; torchvision must be the build "
            "of the installed torch: PyPI's for PyPI's torch, https://download.pytorch.org/whl/cpu for a CPU build)")

AUTOCAST = "autocast"
_DEFORM_CONV = ("BiRefNet's decoder uses torchvision's deform_conv2d, which has no bfloat16 kernel "
                "(CPU or CUDA): use float16 or autocast")
_RMBG_HALF = ("RMBG-2.0's code adds a float32 window mask to half-precision attention, which fails "
              "(fixed in BiRefNet's code, not in RMBG-2.0's copy): use autocast or float32")
# family -> (dtype `auto` picks on CUDA, {dtype it cannot run: why}); float32 on the CPU.
FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    "birefnet": ("float16", {"bfloat16": _DEFORM_CONV}),
    "rmbg-2.0": (AUTOCAST, {"float16": _RMBG_HALF, "bfloat16": f"{_DEFORM_CONV}; and {_RMBG_HALF}"}),
}


def family_of(weights: str) -> str:
    """The code family of ``weights`` when the config names none: RMBG-2.0 by its name."""
    return "rmbg-2.0" if "rmbg" in weights.lower() else "birefnet"


def refused_dtype(family: str, dtype: str) -> str | None:
    """Why ``family`` cannot run in ``dtype`` (None when it can)."""
    return FAMILIES[family][1].get(dtype)


class BiRefNetEngine(SegmentationEngine):
    """Foreground masks from a BiRefNet-architecture model (hub id or local directory).

    ``input_size`` is the square size the model runs at: 1024 for BiRefNet and
    RMBG-2.0 (the default), 2048 for BiRefNet_HR; tests use the tiny model at 64.
    ``dynamic_size`` (BiRefNet_dynamic) instead runs each image at its own aspect
    ratio, longer side at most ``input_size``, sides rounded to multiples of 32.

    Speed options (GPU paths; each one also runs, and is tested, on the CPU):

    - ``dtype``: ``"auto"`` is what the ``family`` runs on a GPU (``FAMILIES``) and
      float32 on the CPU; ``"autocast"`` keeps float32 weights and runs the forward
      under ``torch.autocast`` (float16 on CUDA, bfloat16 on the CPU); a dtype the
      family cannot run is refused; ``"float16"`` on the CPU falls back to float32.
    - ``channels_last``: weights and input in NHWC memory layout, which cuDNN's and
      oneDNN's convolutions prefer (tensor cores on GPUs).
    - ``compile``: ``torch.compile`` the model; the warm-up compiles it at load.
    - ``pin_memory`` (CUDA only): batches are staged in reused page-locked buffers and
      copied with ``non_blocking=True``, so host-device copies run at full speed.
    - ``warmup``: run the model at load (batches of 1 and 2 at ``input_size``), so
      lazy initialisation, kernel selection and compilation are not the first user's
      wait. Off by default here (constructing an engine runs nothing); the service's
      config turns it on.

    A batch runs as one model call per distinct input shape (buckets): a call never
    mixes or pads shapes. With a fixed ``input_size`` every image has the same shape.
    """

    name = "birefnet"
    SIZE_MULTIPLE = 32  # BiRefNet_dynamic's side lengths

    def __init__(
        self,
        weights: str,
        device: str = "auto",
        dtype: str = "auto",
        input_size: int = 1024,
        revision: str | None = None,
        *,
        family: str | None = None,
        dynamic_size: bool = False,
        channels_last: bool = False,
        compile: bool = False,  # noqa: A002 - the config's name for torch.compile
        pin_memory: bool = True,
        warmup: bool = False,
    ) -> None:
        if int(input_size) != input_size or input_size < 1:
            raise ValueError(f"input_size must be a positive integer, not {input_size!r}")
        if dynamic_size and input_size < self.SIZE_MULTIPLE:
            raise ValueError(f"dynamic_size needs input_size >= {self.SIZE_MULTIPLE}, not {input_size}")
        self.family = family or family_of(weights)
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {self.family!r}")
        self.dtype_setting = canonical_dtype(dtype, AUTOCAST)
        if refused := refused_dtype(self.family, self.dtype_setting):
            raise ValueError(f"{weights} cannot run in {self.dtype_setting}: {refused}")
        self.weights = weights
        self.device_setting = device
        self.input_size = int(input_size)
        self.revision = revision
        self.dynamic_size = bool(dynamic_size)
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.pin_memory = bool(pin_memory)
        self.warmup = bool(warmup)
        self.warmup_s: float | None = None  # how long the warm-up took, once done
        self._model: Any = None
        self._device: str | None = None
        self._dtype: Any = None
        self._autocast: Any = None  # the dtype the forward is autocast to, if it is
        self._pinned = False
        self._staging: dict[tuple[int, ...], Any] = {}  # pinned buffers by (H, W, C)
        self._lock = threading.Lock()  # staging buffers are reused: one predict at a time
        self._scale: Any = None  # 1 / (255 * std), shape (1, 3, 1, 1)
        self._shift: Any = None  # mean / std
        # Until load(): what is configured (the size is already what predict wants).
        self.info = self._info(device, dtype)

    def _info(self, device: str, dtype: str) -> EngineInfo:
        if self.dynamic_size:
            return EngineInfo(engine=self.name, device=device, dtype=dtype, max_side=self.input_size)
        return EngineInfo(engine=self.name, device=device, dtype=dtype, input_size=(self.input_size, self.input_size))

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the weights (raises WeightsUnavailable when they cannot be had), then warm up."""
        if self._model is not None:
            return
        import torch

        device = resolve_device(self.device_setting)
        dtype, autocast = self._resolve_precision(device)
        model = load_pretrained(load_remote_model, self.weights, revision=self.revision,
                                ignore_patterns=HUB_IGNORE_PATTERNS, pip_hint=PIP_HINT)
        model.eval().requires_grad_(False)
        model.to(device=device, dtype=dtype)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            model = torch.compile(model, dynamic=True if self.dynamic_size else None)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = mean / std
        self._model, self._device, self._dtype, self._autocast = model, device, dtype, autocast
        self._pinned = self.pin_memory and device.startswith("cuda")
        self.info = self._info(device, self.precision_name)
        if self.warmup:
            self._warm_up()
        options = [name for name, on in (("channels_last", self.channels_last), ("compiled", self.compile),
                                         ("pinned", self._pinned), ("dynamic size", self.dynamic_size)) if on]
        log.info("birefnet %s loaded on %s as %s at %dx%d%s%s", self.weights, device, self.precision_name,
                 self.input_size, self.input_size, f" ({', '.join(options)})" if options else "",
                 f", warmed up in {self.warmup_s:.2f} s" if self.warmup_s is not None else "")

    @property
    def precision_name(self) -> str:
        """What the model runs in: ``float16``, or ``autocast(float16)`` over float32 weights."""
        if self._autocast is not None:
            return f"{AUTOCAST}({dtype_name(self._autocast)})"
        return dtype_name(self._dtype) if self._dtype is not None else self.dtype_setting

    def _resolve_precision(self, device: str):
        """(dtype of the weights, dtype the forward is autocast to or None) on ``device``."""
        import torch

        kind = device.split(":", 1)[0]
        setting = self.dtype_setting
        if setting == "auto":
            if kind != "cuda":
                return torch.float32, None
            setting = FAMILIES[self.family][0]
        if setting == AUTOCAST:
            return torch.float32, torch.float16 if kind == "cuda" else torch.bfloat16
        return resolve_dtype(setting, device), None

    def _warm_up(self) -> None:
        """Run the model on batches of 1 and 2 (a compiled model then has a dynamic batch size)."""
        n = self.input_size
        grey = np.full((n, n, 3), 128, np.uint8)
        started = time.perf_counter()
        self.predict([grey])
        self.predict([grey, grey])
        self.warmup_s = time.perf_counter() - started

    def run_shape(self, image: np.ndarray) -> tuple[int, int]:
        """The (height, width) ``image`` runs at: ``input_size`` square, or with
        ``dynamic_size`` its own shape scaled to fit, rounded to multiples of 32."""
        if not self.dynamic_size:
            return self.input_size, self.input_size
        h, w = image.shape[:2]
        scale = min(1.0, self.input_size / max(h, w))
        m = self.SIZE_MULTIPLE

        def side(x: float) -> int:
            return max(m, min(self.input_size // m * m, int(round(x * scale / m)) * m))

        return side(h), side(w)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 HxW masks (255 = foreground) for HxWx3 uint8 RGB images, one batch."""
        if not images:
            return []
        if self._model is None:
            raise RuntimeError("BiRefNetEngine.predict called before load()")
        rgb = [_as_rgb(im) for im in images]
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(rgb):
            buckets.setdefault(self.run_shape(image), []).append(index)
        masks: list[np.ndarray | None] = [None] * len(rgb)
        with self._lock:
            for (h, w), indices in buckets.items():
                batch = [rgb[i] if rgb[i].shape[:2] == (h, w) else _resize(rgb[i], h, w) for i in indices]
                for i, mask in zip(indices, self._run(batch, h, w)):
                    height, width = rgb[i].shape[:2]
                    # Bilinear back to the image's size, as the models' own code does.
                    same = mask.shape == (height, width)
                    masks[i] = mask if same else _resize(mask, height, width, bilinear=True)
        return masks

    def _run(self, batch: list[np.ndarray], h: int, w: int) -> np.ndarray:
        """One model call on same-shape images: (B, h, w) uint8 masks."""
        import torch
        import torch.nn.functional as F

        x = self._upload(batch, h, w)  # B,h,w,3 uint8 on the device
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        # One copy to float32 NCHW (or NHWC), normalised in place, then the model's dtype.
        x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=layout)
        x.mul_(self._scale).sub_(self._shift)
        x = x.to(self._dtype)
        autocast = (torch.autocast(self._device.split(":", 1)[0], dtype=self._autocast)
                    if self._autocast is not None else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            logits = _final_logits(self._model(x))
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
            masks = logits[:, 0].float().sigmoid_().mul_(255.0).round_().to(torch.uint8)
        return self._download(masks)

    def _upload(self, batch: list[np.ndarray], h: int, w: int):
        import torch

        if not self._pinned:
            return torch.from_numpy(np.stack(batch)).to(self._device)
        staging = self._staging_buffer(len(batch), (h, w, 3))
        np.stack(batch, out=staging.numpy())
        return staging.to(self._device, non_blocking=True)

    def _download(self, masks) -> np.ndarray:
        if not self._pinned:
            return masks.cpu().numpy()
        import torch

        out = self._staging_buffer(masks.shape[0], tuple(masks.shape[1:]))
        out.copy_(masks, non_blocking=True)
        torch.cuda.current_stream(self._device).synchronize()
        return out.numpy().copy()  # the buffer is reused by the next call

    def _staging_buffer(self, count: int, shape: tuple[int, ...]):
        """The first ``count`` rows of a reused page-locked uint8 buffer of ``shape`` rows."""
        import torch

        buffer = self._staging.get(shape)
        if buffer is None or buffer.shape[0] < count:
            buffer = torch.empty((count, *shape), dtype=torch.uint8).pin_memory()
            self._staging[shape] = buffer
        return buffer[:count]


def _final_logits(out: Any) -> Any:
    """The full-resolution logit map (B,1,H,W) from a BiRefNet forward output."""
    while isinstance(out, (list, tuple)):
        if not out:
            raise RuntimeError("model returned an empty list of logit maps")
        out = out[-1]
    if out.ndim == 3:
        out = out.unsqueeze(1)
    if out.ndim != 4 or out.shape[1] != 1:
        raise RuntimeError(f"model's last output has shape {tuple(out.shape)}, expected (B, 1, H, W)")
    return out


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be HxWx3 RGB, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _resize(image: np.ndarray, height: int, width: int, bilinear: bool = False) -> np.ndarray:
    """Resize to (height, width): area averaging when shrinking (no aliasing), else
    bilinear; ``bilinear`` always (masks, as the models' code resizes them)."""
    import cv2

    shrink = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrink and not bilinear else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


__all__ = ["BiRefNetEngine", "FAMILIES", "WeightsUnavailable", "HUB_IGNORE_PATTERNS", "family_of", "refused_dtype"]
