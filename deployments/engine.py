"""What a segmentation engine is: plain Python that turns images into masks.

Engines know nothing of Ray or HTTP, so they are unit-testable and benchmarkable
alone. A Serve deployment wraps one engine; the ingress prepares its input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EngineInfo:
    """How an engine runs and what input it wants.

    ``input_size`` (width, height) means the engine wants exactly that size (aspect
    not kept, as BiRefNet); otherwise ``max_side`` bounds the longer side (aspect
    kept). With neither, any size is fine.
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
