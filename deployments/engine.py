"""What a segmentation engine is: plain Python that turns images into masks.

Engines know nothing of Ray or HTTP, so they are unit-testable and benchmarkable
alone. A Serve deployment wraps one engine; the ingress prepares its input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EngineInfo:
    """How an engine runs and what input it wants.

    ``input_size`` (width, height) is the size the engine runs at (aspect not kept,
    as BiRefNet): callers shrink larger images to exactly it and send smaller ones
    as they are, for the engine to enlarge (fewer bytes to move). Otherwise
    ``max_side`` bounds the longer side (aspect kept). With neither, any size is fine.
    """

    engine: str
    device: str = "cpu"
    dtype: str = "uint8"
    input_size: tuple[int, int] | None = None
    max_side: int | None = None


class SegmentationEngine(ABC):
    """Foreground segmentation: RGB images in, alpha masks out."""

    info: EngineInfo

    @abstractmethod
    def load(self) -> None:
        """Load weights or build state; called once before the first predict."""

    @abstractmethod
    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Masks for a batch.

        Each image is HxWx3 uint8 RGB; each mask is HxW uint8 (255 = foreground) of
        the same height and width as its image. Images in one batch may differ in
        size unless ``info.input_size`` is set (then the caller sends that size).
        """

    def predict_with_warnings(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, str | None]]:
        """Masks for a batch, each with a warning for its user when the engine can tell
        that its mask is likely poor (None when all is well, and from engines that cannot)."""
        return [(mask, None) for mask in self.predict(images)]


@dataclass(frozen=True)
class LayerParams:
    """What a layer decomposition is asked for (DESIGN.md section 2)."""

    layers: int = 4
    resolution: int = 640
    steps: int = 50
    seed: int | None = None
    prompt: str | None = None
    true_cfg_scale: float = 4.0


class DecompositionCancelled(Exception):
    """Raised by an engine when its progress callback asked it to stop."""


class LayerEngine(ABC):
    """Layer decomposition: one RGBA image in, N RGBA layers out, back to front."""

    info: EngineInfo

    @abstractmethod
    def load(self) -> None:
        """Load weights or build state; called once before the first decompose."""

    @abstractmethod
    def decompose(
        self,
        image: np.ndarray,
        params: LayerParams,
        on_step: Callable[[int, int], bool] | None = None,
    ) -> list[np.ndarray]:
        """Layers of `image` (HxWx4 uint8 RGBA), background first.

        Returns ``params.layers`` HxWx4 uint8 RGBA arrays of the input's size that
        stack (alpha-over, first at the bottom) back into the image. ``on_step(step,
        total)`` is called after each step (1-based); when it returns False the
        engine stops at that step and raises DecompositionCancelled.
        """
