"""Weights-free engines built from classic image processing.

``ClassicCutoutEngine`` removes plain or gradient backgrounds, as in studio and
e-commerce product shots, without any model weights:

1. A smooth background colour model (a low-order polynomial of position per Lab
   channel) is fitted robustly to a band of border pixels; every pixel's distance
   from it, in units of the fit's noise, says how unlike the background it is.
2. GrabCut, seeded from that distance map, segments at a reduced size.
3. Speckles are dropped; holes larger than a speckle (a mug handle) are kept.
4. A guided filter mats a narrow band around the boundary at working resolution,
   so edges come out anti-aliased.

It does well when the object stands out from a backdrop that varies smoothly;
busy scenes, a backdrop the object mostly covers at the border, soft shadows and
objects the colour of the backdrop are beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from deployments.engine import EngineInfo, SegmentationEngine

# Segmentation runs at this longer side; matting at the engine's max_side.
_CUTOUT_SEGMENT_SIDE = 512
# Width of the border band that seeds the background model, as a fraction of the
# longer side.
_BORDER_FRACTION = 0.02
# Distances are in units of the background fit's typical residual (its median).
# Border pixels nearer than this are background for sure.
_BACKGROUND_Z = 3.0
# Pixels this far from the background model seed GrabCut as probable foreground.
_FOREGROUND_Z = 6.0
# Floor for the noise unit, in Lab units, so a noiseless backdrop does not turn
# imperceptible differences into foreground.
_MIN_NOISE_LAB = 1.0
_GRABCUT_ITERATIONS = 4
# Foreground components and holes smaller than this fraction of the image are
# speckle.
_SPECKLE_FRACTION = 0.0005


@dataclass(frozen=True)
class _BackgroundFit:
    """A background colour model evaluated on an image's pixel grid."""

    lab: np.ndarray  # HxWx3 float32, the predicted background in Lab
    noise: float  # typical distance of a background pixel from the model, Lab units
    border_inliers: np.ndarray  # HxW bool, border pixels that fit the model


class ClassicCutoutEngine(SegmentationEngine):
    """Background removal for product shots on plain or gradient backdrops."""

    info = EngineInfo(engine="classic", device="cpu", dtype="uint8", max_side=1024)

    def load(self) -> None:
        """Nothing to load: the engine has no weights."""

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One alpha mask per image, HxW uint8, 255 = foreground."""
        return [self._cutout(image) for image in images]

    def _cutout(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            return np.zeros((height, width), np.uint8)
        work = _fit_within(image, self.info.max_side)
        small = _fit_within(work, _CUTOUT_SEGMENT_SIDE)
        foreground = _segment(small)
        if not foreground.any():
            return np.zeros((height, width), np.uint8)
        alpha = _mat_edges(work, foreground)
        if alpha.shape != (height, width):
            alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_LINEAR)
        return alpha


def _fit_within(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The image shrunk so its longer side is at most ``max_side`` (aspect kept)."""
    height, width = image.shape[:2]
    longer = max(height, width)
    if max_side is None or longer <= max_side:
        return image
    scale = max_side / longer
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _segment(rgb: np.ndarray) -> np.ndarray:
    """Hard foreground mask (bool) of a small RGB image."""
    # A light blur keeps sensor and JPEG noise out of the distance map.
    lab = cv2.cvtColor(cv2.GaussianBlur(rgb, (3, 3), 0).astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    background = _fit_border_background(lab)
    residual = lab - background.lab
    z = np.linalg.norm(residual, axis=2) / background.noise
    seeds = z > _FOREGROUND_Z
    if not _drop_speckle(seeds).any():
        return np.zeros(z.shape, bool)

    labels = np.full(z.shape, cv2.GC_PR_BGD, np.uint8)
    labels[seeds] = cv2.GC_PR_FGD
    labels[background.border_inliers] = cv2.GC_BGD
    # Segment the residual, where the backdrop is a flat grey whatever its
    # gradient, so GrabCut's colour models need not learn the gradient.
    flat = np.clip(residual + 128.0, 0, 255).astype(np.uint8)
    try:
        cv2.grabCut(
            flat,
            labels,
            None,
            np.zeros((1, 65), np.float64),
            np.zeros((1, 65), np.float64),
            _GRABCUT_ITERATIONS,
            cv2.GC_INIT_WITH_MASK,
        )
        foreground = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    except cv2.error:
        # GrabCut refuses when one class has no samples (e.g. the whole image is
        # border); the distance seeds are the best answer then.
        foreground = seeds
    return _drop_speckle(foreground)


def _fit_border_background(lab: np.ndarray) -> _BackgroundFit:
    """Fit the backdrop as a smooth function of position to the border band.

    The fit is a least-squares polynomial in (x, y) per Lab channel, refitted
    without outliers so an object touching the border does not drag it along.
    """
    height, width = lab.shape[:2]
    band = max(1, round(_BORDER_FRACTION * max(height, width)))
    border = np.ones((height, width), bool)
    border[band:-band, band:-band] = False

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs = xs * (2.0 / max(width - 1, 1)) - 1.0
    ys = ys * (2.0 / max(height - 1, 1)) - 1.0
    samples = int(border.sum())
    # Fewer terms when the border is too short to pin a quadratic down.
    if samples >= 60:
        terms = [np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys]
    elif samples >= 12:
        terms = [np.ones_like(xs), xs, ys]
    else:
        terms = [np.ones_like(xs)]
    design = np.stack([t[border] for t in terms], axis=1)
    colours = lab[border]

    inliers = np.ones(samples, bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[inliers], colours[inliers], rcond=None)
        distance = np.linalg.norm(design @ coef - colours, axis=1)
        noise = max(float(np.median(distance[inliers])), _MIN_NOISE_LAB)
        refit = distance < _BACKGROUND_Z * noise
        if refit.sum() < design.shape[1] or np.array_equal(refit, inliers):
            break
        inliers = refit

    predicted = np.stack(terms, axis=2) @ coef
    border_inliers = np.zeros((height, width), bool)
    border_inliers[border] = distance < _BACKGROUND_Z * noise
    return _BackgroundFit(predicted.astype(np.float32), noise, border_inliers)


def _drop_speckle(mask: np.ndarray) -> np.ndarray:
    """The mask without tiny foreground blobs and with tiny holes filled."""
    min_area = max(2, round(_SPECKLE_FRACTION * mask.size))
    kept = _drop_small_components(mask, min_area)
    return ~_drop_small_components(~kept, min_area)


def _drop_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    large = stats[:, cv2.CC_STAT_AREA] >= min_area
    large[0] = False  # label 0 is the mask's complement
    return large[labels]


def _mat_edges(rgb: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Alpha at ``rgb``'s size: 255 inside, 0 outside, soft in the edge band."""
    height, width = rgb.shape[:2]
    scale = max(height, width) / max(foreground.shape)
    upsampled = cv2.resize(foreground.astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_LINEAR)
    hard = upsampled >= 128
    # The band spans the segmentation's uncertainty (about one small-image pixel)
    # plus the width of a soft edge.
    radius = max(2, round(1.5 * scale) + 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    hard_u8 = hard.astype(np.uint8)
    band = (cv2.dilate(hard_u8, kernel) > 0) & ~(cv2.erode(hard_u8, kernel) > 0)
    guide = rgb.astype(np.float32) / 255.0
    soft = cv2.ximgproc.guidedFilter(guide, hard.astype(np.float32), radius, 1e-3)
    alpha = np.where(hard, 255, 0).astype(np.uint8)
    alpha[band] = np.clip(np.rint(soft[band] * 255.0), 0, 255).astype(np.uint8)
    return alpha
