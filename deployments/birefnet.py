"""The BiRefNet-family engine: BiRefNet, its variants, RMBG-2.0 (same architecture).

Plain Python (no Ray, no HTTP); torch and transformers are imported in ``load`` and
``predict``, so importing this module is cheap and torch-free.

What the real models want (DESIGN.md section 2): RGB at a fixed square size (1024 for
BiRefNet and RMBG-2.0, 2048 for BiRefNet_HR; aspect not kept), /255, ImageNet mean and
std; ``model(x)`` returns a list of logit maps, the last at full resolution; its
sigmoid is the mask. No min-max stretch: a picture with no foreground gets an empty
mask, not its noise amplified to 255.

The caller (the ingress) resizes to ``info.input_size`` and resizes the mask back to
the original size; an image of another size is still accepted here (resized in and the
mask resized back), so ``predict`` always answers masks the size of its images.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .engine import EngineInfo, SegmentationEngine
from .weights import WeightsUnavailable, dtype_name, load_pretrained, resolve_device, resolve_dtype

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
PIP_HINT = "pip install 'strata[gpu]' (timm, kornia, einops, torchvision)"


class BiRefNetEngine(SegmentationEngine):
    """Foreground masks from a BiRefNet-architecture model (hub id or local directory).

    ``input_size`` is the square size the model runs at: 1024 for BiRefNet and
    RMBG-2.0 (the default), 2048 for BiRefNet_HR, any multiple of 32 for
    BiRefNet_dynamic; tests use the tiny model at 64.
    """

    name = "birefnet"

    def __init__(
        self,
        weights: str,
        device: str = "auto",
        dtype: str = "auto",
        input_size: int = 1024,
        revision: str | None = None,
    ) -> None:
        if int(input_size) != input_size or input_size < 1:
            raise ValueError(f"input_size must be a positive integer, not {input_size!r}")
        self.weights = weights
        self.device_setting = device
        self.dtype_setting = dtype
        self.input_size = int(input_size)
        self.revision = revision
        self._model: Any = None
        self._device: str | None = None
        self._dtype: Any = None
        self._scale: Any = None  # 1 / (255 * std), shape (1, 3, 1, 1)
        self._shift: Any = None  # mean / std
        # Until load(): what is configured (the size is already what predict wants).
        self.info = EngineInfo(engine=self.name, device=device, dtype=dtype,
                               input_size=(self.input_size, self.input_size))

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the weights (raises WeightsUnavailable when they cannot be had)."""
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForImageSegmentation

        device = resolve_device(self.device_setting)
        dtype = resolve_dtype(self.dtype_setting, device)
        model = load_pretrained(
            AutoModelForImageSegmentation.from_pretrained,
            self.weights,
            revision=self.revision,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            pip_hint=PIP_HINT,
            trust_remote_code=True,
        )
        model.eval().requires_grad_(False)
        model.to(device=device, dtype=dtype)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = mean / std
        self._model, self._device, self._dtype = model, device, dtype
        self.info = EngineInfo(engine=self.name, device=device, dtype=dtype_name(dtype),
                               input_size=(self.input_size, self.input_size))
        log.info("birefnet %s loaded on %s as %s at %dx%d", self.weights, device,
                 dtype_name(dtype), self.input_size, self.input_size)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 HxW masks (255 = foreground) for HxWx3 uint8 RGB images, one batch."""
        if not images:
            return []
        if self._model is None:
            raise RuntimeError("BiRefNetEngine.predict called before load()")
        import torch
        import torch.nn.functional as F

        n = self.input_size
        rgb = [_as_rgb(im) for im in images]
        sizes = [im.shape[:2] for im in rgb]
        batch = np.stack([im if im.shape[:2] == (n, n) else _resize(im, n, n) for im in rgb])

        x = torch.from_numpy(batch).to(self._device)            # B,H,W,3 uint8
        x = x.permute(0, 3, 1, 2).float()                       # B,3,H,W
        x = (x * self._scale - self._shift).to(self._dtype).contiguous()
        with torch.inference_mode():
            out = self._model(x)
            logits = _final_logits(out)
            if logits.shape[-2:] != (n, n):
                logits = F.interpolate(logits.float(), size=(n, n), mode="bilinear",
                                       align_corners=False)
            masks = logits.float().sigmoid_().mul_(255.0).round_().to(torch.uint8)
        masks = masks[:, 0].cpu().numpy()

        result = []
        for mask, (h, w) in zip(masks, sizes):
            result.append(mask if (h, w) == (n, n) else _resize(mask, h, w))
        return result


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


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    shrink = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


__all__ = ["BiRefNetEngine", "WeightsUnavailable", "HUB_IGNORE_PATTERNS"]
