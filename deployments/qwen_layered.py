"""The Qwen-Image-Layered engine: one RGBA image in, N RGBA layers out, background first.

Plain Python (no Ray, no HTTP); torch and diffusers are imported in ``load`` and
``decompose``, so importing this module is cheap and torch-free.

What the real model wants (DESIGN.md section 2): ``diffusers.QwenImageLayeredPipeline``
(~55 GB: 20B MMDiT, Qwen2.5-VL-7B text encoder, RGBA VAE), called with ONE image per
call (the pipeline mis-groups outputs for batch > 1; scale with replicas). What the
pipeline does with it (diffusers 0.42.1, read from its code and checked on a tiny one):

- It resizes the input to its resolution bucket: about ``resolution``² pixels with the
  input's aspect ratio, sides rounded to multiples of 32 (a 64x48 input runs at
  736x544 in the 640 bucket), and returns the layers at that size. We resize them back
  to the input's size (premultiplied, so transparent pixels do not bleed colour).
- An empty prompt (``None``, ``""`` or ``" "``) makes it caption the image with
  Qwen2.5-VL first (``use_en_prompt`` picks English or Chinese captions); that needs its
  ``Qwen2VLProcessor``, hence torchvision. Without torchvision the pipeline is loaded
  with ``processor=None`` and a prompt is required (ValueError here otherwise).
- CFG runs only when ``true_cfg_scale > 1`` and a negative prompt is given: we always
  pass ``negative_prompt=" "`` as the model card does (two transformer passes a step).
- ``callback_on_step_end(pipe, i, t, kwargs)`` runs after each step (i 0-based) and
  must return a dict. Its interrupt flag (``pipe._interrupt``) only skips the remaining
  steps: the pipeline still VAE-decodes the half-denoised latents and returns them. A
  cancelled decomposition wants no result, so the callback here also raises, which
  skips that decode; we then restore CPU-offload hooks (``maybe_free_model_hooks``),
  as the pipeline would have at its end, and raise DecompositionCancelled.

The model card's example sets ``cfg_normalize=True`` and ``use_en_prompt=True`` (the
pipeline's own defaults are False for both): those are this engine's defaults; a
LayerParams carrying either attribute overrides them per call.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .engine import DecompositionCancelled, EngineInfo, LayerEngine, LayerParams
from .weights import WeightsUnavailable, dtype_name, load_pretrained, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

RESOLUTIONS = (640, 1024)
NEGATIVE_PROMPT = " "  # enables true CFG (see module docstring), as the model card does

# What a hub snapshot of the pipeline needs: model_index.json, component configs,
# safetensors, tokenizer and processor files. Skip pickled duplicates and pictures.
HUB_IGNORE_PATTERNS = (
    "*.bin", "*.pth", "*.pt", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "onnx/*", "*.gguf",
    "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", "*.mp4",
)
PIP_HINT = "pip install 'diffusers>=0.42.1' accelerate torchvision"
NO_GPU_REASON = (
    "no GPU: Qwen-Image-Layered needs ~55 GB of weights (an 80 GB-class GPU in bf16, or 48 GB "
    "with cpu_offload) and is never loaded into CPU memory by default; set device: cpu to "
    "force it (very slow)"
)


class _Interrupted(Exception):
    """Raised inside the pipeline's step callback to stop it (never escapes decompose)."""


class QwenLayeredEngine(LayerEngine):
    """Layer decomposition with Qwen-Image-Layered (hub id or local directory).

    ``device``: ``"auto"`` takes the GPU and refuses to run without one (load raises
    WeightsUnavailable, so a configured fallback can take over); ``"cpu"`` forces the
    CPU; ``"cuda"``, ``"cuda:N"`` pick a GPU. ``dtype``: ``"auto"`` is bfloat16 on any GPU
    (the dtype the model was trained and published in), float32 on the CPU; an explicit
    ``"bfloat16"`` is honoured on the CPU too (the real model in float32 is ~110 GB).
    ``cpu_offload`` keeps each component in CPU memory until it runs (accelerate's model
    offload, for 48 GB GPUs; slower, as the weights cross PCIe on every call).
    ``attention_backend`` is a diffusers attention backend for the transformer
    ("native", "flash", "_flash_3", "sage", ... the values of
    ``diffusers.models.attention_dispatch.AttentionBackendName``); None keeps diffusers'
    default (torch SDPA). An unknown name is a ValueError before any weights load; a
    backend whose package is missing is WeightsUnavailable. The ``*_hub`` backends fetch
    kernels from the Hugging Face hub when set. diffusers makes the chosen backend the
    process-wide active one.

    ``first_block_cache_threshold`` turns on diffusers' First Block Cache on the
    transformer: at each step the first block runs, and when its output changed by
    less than this fraction (relative mean absolute difference) since the previous
    step, the other blocks are skipped and their cached residual reused. None (off)
    keeps every step exact; 0.05-0.1 is diffusers' suggested range (faster, slightly
    different images). ``warmup`` runs one one-step decomposition of a small image at
    load, so CUDA start-up, kernel selection and memory growth are not the first job's
    (off by default here, so constructing an engine runs nothing; the service's config
    turns it on).
    """

    name = "qwen-image-layered"

    def __init__(
        self,
        weights: str,
        device: str = "auto",
        dtype: str = "auto",
        cpu_offload: bool = False,
        attention_backend: str | None = None,
        revision: str | None = None,
        cfg_normalize: bool = True,
        use_en_prompt: bool = True,
        first_block_cache_threshold: float | None = None,
        warmup: bool = False,
    ) -> None:
        if first_block_cache_threshold is not None and not (
            math.isfinite(first_block_cache_threshold) and first_block_cache_threshold > 0
        ):
            raise ValueError(f"first_block_cache_threshold must be a positive number or None, "
                             f"not {first_block_cache_threshold!r}")
        self.weights = weights
        self.device_setting = device
        self.dtype_setting = dtype
        self.cpu_offload = bool(cpu_offload)
        self.attention_backend = (attention_backend or "").strip().lower() or None
        self.revision = revision
        self.cfg_normalize = bool(cfg_normalize)
        self.use_en_prompt = bool(use_en_prompt)
        self.first_block_cache_threshold = first_block_cache_threshold
        self.warmup = bool(warmup)
        self.warmup_s: float | None = None  # how long the warm-up took, once done
        self._pipe: Any = None
        self._device: str | None = None
        self._lock = threading.Lock()  # the pipeline is stateful: one call at a time
        # Until load(): what is configured.
        self.info = EngineInfo(engine=self.name, device=device, dtype=dtype)

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    @property
    def can_caption(self) -> bool:
        """Whether an empty prompt works (the pipeline has its Qwen2VL processor)."""
        return self._pipe is not None and getattr(self._pipe, "processor", None) is not None

    # ------------------------------------------------------------------ load

    def load(self) -> None:
        """Load the pipeline (raises WeightsUnavailable when it cannot run here)."""
        if self._pipe is not None:
            return
        device = self._resolve_device()
        dtype = self._resolve_dtype(device)
        kind = device.split(":", 1)[0]
        offload = self.cpu_offload and kind != "cpu"
        if self.cpu_offload and not offload:
            log.warning("cpu_offload ignored: device is %s", device)
        if offload and importlib.util.find_spec("accelerate") is None:
            raise WeightsUnavailable("cpu_offload needs the accelerate package: pip install accelerate",
                                     source=self.weights)
        try:
            from diffusers import QwenImageLayeredPipeline
        except ImportError as e:
            raise WeightsUnavailable(f"Qwen-Image-Layered needs diffusers with QwenImageLayeredPipeline "
                                     f"({e}): {PIP_HINT}", source=self.weights) from e

        if self.attention_backend:  # a misspelt name fails before 55 GB are loaded
            _check_attention_backend_name(self.attention_backend)

        if importlib.util.find_spec("accelerate") is None:
            log.warning("accelerate is not installed: %s is loaded without low_cpu_mem_usage "
                        "(slower, and briefly twice the memory): pip install accelerate", self.weights)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if importlib.util.find_spec("torchvision") is None:
            # Qwen2VLProcessor (image captioning) needs torchvision: load without it.
            log.warning("torchvision is not installed: %s is loaded without its image captioner, "
                        "so every decomposition needs a prompt", self.weights)
            kwargs["processor"] = None
        pipe = load_pretrained(
            QwenImageLayeredPipeline.from_pretrained,
            self.weights,
            revision=self.revision,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            pip_hint=PIP_HINT,
            **kwargs,
        )
        if self.attention_backend:
            self._set_attention_backend(pipe)
        if self.first_block_cache_threshold is not None:
            from diffusers import FirstBlockCacheConfig

            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=self.first_block_cache_threshold))
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self._pipe, self._device = pipe, device
        self.info = EngineInfo(engine=self.name, device=device, dtype=dtype_name(dtype))
        if self.warmup:
            self._warm_up()
        log.info("qwen-image-layered %s loaded on %s as %s%s%s%s%s", self.weights, device,
                 dtype_name(dtype), " with model CPU offload" if offload else "",
                 f", attention {self.attention_backend}" if self.attention_backend else "",
                 f", first block cache {self.first_block_cache_threshold:g}"
                 if self.first_block_cache_threshold is not None else "",
                 f", warmed up in {self.warmup_s:.1f} s" if self.warmup_s is not None else "")

    def _warm_up(self) -> None:
        """One one-step, two-layer decomposition of a small grey image (with a prompt, so
        no captioning): every component runs once before the first job."""
        grey = np.full((64, 64, 4), (128, 128, 128, 255), np.uint8)
        started = time.perf_counter()
        self.decompose(grey, LayerParams(layers=2, resolution=RESOLUTIONS[0], steps=1, seed=0, prompt="warm-up"))
        self.warmup_s = time.perf_counter() - started

    def _resolve_device(self) -> str:
        import torch

        setting = (self.device_setting or "auto").strip().lower()
        if setting == "auto" and not torch.cuda.is_available():
            raise WeightsUnavailable(NO_GPU_REASON, source=self.weights)
        device = resolve_device(setting)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise WeightsUnavailable(f"device {device} asked for, but torch sees no CUDA GPU here",
                                     source=self.weights)
        return device

    def _resolve_dtype(self, device: str):
        import torch

        setting = (self.dtype_setting or "auto").strip().lower()
        kind = device.split(":", 1)[0]
        if setting == "auto" and kind != "cpu":
            return torch.bfloat16
        if kind == "cpu" and setting in ("bfloat16", "bf16"):
            # Unlike the small models: in float32 this one wants ~110 GB of CPU memory,
            # so an explicit bfloat16 is honoured on the CPU (float16 is not).
            return torch.bfloat16
        return resolve_dtype(setting, device)

    def _set_attention_backend(self, pipe: Any) -> None:
        backend = self.attention_backend
        try:
            pipe.transformer.set_attention_backend(backend)
        except ValueError as e:  # not a backend name diffusers knows
            raise ValueError(f"attention_backend {backend!r} is not a diffusers attention backend: "
                             f"{e}") from e
        except (RuntimeError, ImportError) as e:  # its package (flash-attn, sageattention) missing
            raise WeightsUnavailable(f"attention_backend {backend!r} cannot be used here: "
                                     f"{str(e).rstrip('. ')}; "
                                     "install its package or set attention_backend: native",
                                     source=self.weights) from e

    # ------------------------------------------------------------------ decompose

    def decompose(
        self,
        image: np.ndarray,
        params: LayerParams,
        on_step: Callable[[int, int], bool] | None = None,
    ) -> list[np.ndarray]:
        """``params.layers`` HxWx4 uint8 RGBA layers of ``image``, background first."""
        rgba = _as_rgba(image)
        layers, resolution, steps, cfg, prompt = _check_params(params)
        if self._pipe is None:
            raise RuntimeError("QwenLayeredEngine.decompose called before load()")
        if prompt is None and not self.can_caption:
            raise ValueError("a prompt is required: this pipeline was loaded without its image "
                             "captioner (Qwen2VLProcessor needs torchvision)")
        import torch
        from PIL import Image

        height, width = rgba.shape[:2]
        pipe = self._pipe
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self._device).manual_seed(int(params.seed))

        def step_end(pipeline: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
            if on_step is not None:
                total = getattr(pipeline, "num_timesteps", None) or steps
                if on_step(i + 1, total) is False:
                    pipeline._interrupt = True  # the pipeline's own flag: skip further steps
                    raise _Interrupted  # and skip the VAE decode of an unwanted result
            return {}

        call = dict(
            image=Image.fromarray(rgba, "RGBA"),
            layers=layers,
            resolution=resolution,
            num_inference_steps=steps,
            true_cfg_scale=cfg,
            negative_prompt=NEGATIVE_PROMPT,
            generator=generator,
            callback_on_step_end=step_end,
            cfg_normalize=bool(getattr(params, "cfg_normalize", self.cfg_normalize)),
            use_en_prompt=bool(getattr(params, "use_en_prompt", self.use_en_prompt)),
            num_images_per_prompt=1,
        )
        if prompt is not None:
            call["prompt"] = prompt
        with self._lock:
            try:
                with torch.inference_mode():
                    out = pipe(**call)
            except _Interrupted:
                pipe.maybe_free_model_hooks()  # what the pipeline does at its end (offload)
                raise DecompositionCancelled("decomposition cancelled by its progress callback") from None
            except BaseException:
                pipe.maybe_free_model_hooks()
                raise
        result = out.images[0]
        if len(result) != layers:
            raise RuntimeError(f"pipeline returned {len(result)} layers, expected {layers}")
        return [_resize_rgba(np.asarray(layer.convert("RGBA")), height, width) for layer in result]


# --------------------------------------------------------------------------- helpers


def _check_attention_backend_name(backend: str) -> None:
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except ImportError:  # moved in some diffusers version: set_attention_backend will say
        return
    names = sorted(b.value for b in AttentionBackendName)
    if backend not in names:
        raise ValueError(f"attention_backend {backend!r} is not a diffusers attention backend "
                         f"(one of: {', '.join(names)})")


def _check_params(params: LayerParams) -> tuple[int, int, int, float, str | None]:
    layers, resolution, steps = params.layers, params.resolution, params.steps
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"layers must be a positive integer, not {layers!r}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be 640 or 1024, not {resolution!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, not {steps!r}")
    cfg = float(params.true_cfg_scale)
    if not math.isfinite(cfg):
        raise ValueError(f"true_cfg_scale must be a finite number, not {params.true_cfg_scale!r}")
    if params.seed is not None and (not isinstance(params.seed, int) or isinstance(params.seed, bool)):
        raise ValueError(f"seed must be an integer, not {params.seed!r}")
    prompt = (params.prompt or "").strip() or None
    return layers, int(resolution), steps, cfg, prompt


def _as_rgba(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 3:
        alpha = np.full(image.shape[:2] + (1,), 255, np.uint8)
        image = np.concatenate([image, alpha], axis=2)
    if image.ndim != 3 or image.shape[2] != 4 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be HxWx4 RGBA, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _resize_rgba(layer: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize straight-alpha RGBA, premultiplied so transparent colour does not bleed in."""
    if layer.shape[:2] == (height, width):
        return np.ascontiguousarray(layer)
    import cv2

    shrink = height * width < layer.shape[0] * layer.shape[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    f = layer.astype(np.float32)
    alpha = f[:, :, 3:4] / 255.0
    f[:, :, :3] *= alpha
    f = cv2.resize(f, (width, height), interpolation=interpolation)
    a = np.clip(f[:, :, 3:4], 0.0, 255.0)
    rgb = np.where(a > 0, f[:, :, :3] * (255.0 / np.maximum(a, 1e-6)), 0.0)
    out = np.concatenate([rgb, a], axis=2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


__all__ = ["QwenLayeredEngine", "WeightsUnavailable", "DecompositionCancelled", "HUB_IGNORE_PATTERNS",
           "RESOLUTIONS", "NO_GPU_REASON"]
