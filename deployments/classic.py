"""Weights-free engines built from classic image processing.

``ClassicCutoutEngine`` removes plain or gradient backgrounds, as in studio and
e-commerce product shots, without any model weights:

1. A smooth backdrop colour model (a low-order polynomial of position per Lab
   channel) is fitted robustly to a band of border pixels; every pixel's distance
   from it, in units of the fit's noise, says how unlike the backdrop it is.
2. GrabCut, seeded from that distance map, segments at a reduced size.
3. Speckles are dropped; holes larger than a speckle (a mug handle) are kept.
4. A narrow band around the boundary is matted at working resolution, so edges
   come out anti-aliased: each pixel is unmixed into the nearby object colour
   and the modelled backdrop colour, or, where those two are too alike, a guided
   filter follows the image's edges.

It does well when the object stands out from a backdrop that varies smoothly.
Busy scenes, a border mostly covered by the object, shadows (they count as
object) and objects the colour of the backdrop are beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from deployments.engine import EngineInfo, SegmentationEngine

# Segmentation runs at this longer side; matting at the engine's max_side.
_CUTOUT_SEGMENT_SIDE = 512
# Width of the border band that seeds the backdrop model, as a fraction of the
# longer side.
_BORDER_FRACTION = 0.02
# Refits of the backdrop model to the closer half of the border band.
_TRIM_STEPS = 4
# Distances from the backdrop model are in noise units: the median distance of
# the border pixels that fit it. Pixels nearer than this match the backdrop.
_BACKDROP_Z = 3.0
# Pixels farther than this seed GrabCut as probable foreground.
_FOREGROUND_Z = 6.0
# Floor for the noise unit, in Lab units, so a noiseless backdrop does not turn
# imperceptible differences into foreground.
_MIN_NOISE_LAB = 1.0
# Backdrop-coloured regions wider than twice this fraction of the longer side
# have cores that are background for sure.
_BACKDROP_CORE_FRACTION = 0.01
_GRABCUT_ITERATIONS = 4
# Grey levels that one noise unit spans in the image GrabCut segments.
_RESIDUAL_LEVELS_PER_NOISE = 3.0
# Foreground blobs and holes smaller than this fraction of the image are speckle.
_SPECKLE_FRACTION = 0.0005
# Unmixing needs the object and backdrop colours this far apart (RGB levels).
_MIN_UNMIX_CONTRAST = 24.0
# Unmixed alpha within this of 0 or 1 is texture or noise, not a partial pixel.
_ALPHA_SNAP = 0.06
_GUIDED_EPS = 1e-3


@dataclass(frozen=True)
class _BackdropFit:
    """A backdrop colour model evaluated on an image's pixel grid."""

    lab: np.ndarray  # HxWx3 float32, the predicted backdrop in Lab
    noise: float  # median distance of a border pixel from the model, Lab units
    border_inliers: np.ndarray  # HxW bool, border pixels that fit the model


class ClassicCutoutEngine(SegmentationEngine):
    """Background removal for product shots on plain or gradient backdrops.

    Deterministic: the same image always gets the same mask.
    """

    info = EngineInfo(engine="classic", device="cpu", dtype="uint8", max_side=1024)

    def load(self) -> None:
        """Nothing to load: the engine has no weights."""

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One alpha mask per image, HxW uint8, 255 = foreground.

        Images larger than ``info.max_side`` are processed at that size and their
        masks scaled back up.
        """
        return [self._cutout(image) for image in images]

    def _cutout(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            return np.zeros((height, width), np.uint8)
        work = _fit_within(image, self.info.max_side)
        small = _fit_within(work, _CUTOUT_SEGMENT_SIDE)
        lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
        backdrop = _fit_border_backdrop(lab)
        foreground = _segment_cutout(lab, backdrop)
        if not foreground.any():
            return np.zeros((height, width), np.uint8)
        alpha = _mat_cutout_edges(work, foreground, backdrop.lab)
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


def _fit_border_backdrop(lab: np.ndarray) -> _BackdropFit:
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

    # Least trimmed squares from two starts, all border pixels and the half
    # nearest the median colour: refitting to the closer half walks away from an
    # object covering part of the border, and the start whose closer half ends up
    # fitting best wins. Then the fit takes back every pixel within the noise.
    from_median = np.linalg.norm(colours - np.median(colours, axis=0), axis=1)
    starts = [np.ones(samples, bool), from_median <= np.median(from_median)]
    fits = [_fit_trimmed(design, colours, start) for start in starts]
    coef = min(fits, key=lambda fit: fit[1])[0]
    distance = np.linalg.norm(design @ coef - colours, axis=1)
    inliers = distance <= np.median(distance)
    for _ in range(2):
        noise = max(float(np.median(distance[inliers])), _MIN_NOISE_LAB)
        inliers = distance < _BACKDROP_Z * noise
        coef, *_ = np.linalg.lstsq(design[inliers], colours[inliers], rcond=None)
        distance = np.linalg.norm(design @ coef - colours, axis=1)
    noise = max(float(np.median(distance[inliers])), _MIN_NOISE_LAB)

    predicted = np.stack(terms, axis=2) @ coef
    border_inliers = np.zeros((height, width), bool)
    border_inliers[border] = distance < _BACKDROP_Z * noise
    return _BackdropFit(predicted.astype(np.float32), noise, border_inliers)


def _fit_trimmed(
    design: np.ndarray, colours: np.ndarray, inliers: np.ndarray
) -> tuple[np.ndarray, float]:
    """Concentration steps of least trimmed squares: (coefficients, median distance)."""
    for _ in range(_TRIM_STEPS):
        coef, *_ = np.linalg.lstsq(design[inliers], colours[inliers], rcond=None)
        distance = np.linalg.norm(design @ coef - colours, axis=1)
        inliers = distance <= np.median(distance)
    return coef, float(np.median(distance))


def _segment_cutout(lab: np.ndarray, backdrop: _BackdropFit) -> np.ndarray:
    """Hard foreground mask (bool) of a small Lab image, by seeded GrabCut."""
    residual = lab - backdrop.lab
    # A light blur keeps sensor and JPEG noise out of the distance map.
    z = np.linalg.norm(cv2.GaussianBlur(residual, (3, 3), 0), axis=2) / backdrop.noise
    seeds = z > _FOREGROUND_Z
    if not _drop_speckle(seeds).any():
        return np.zeros(z.shape, bool)

    labels = np.full(z.shape, cv2.GC_PR_BGD, np.uint8)
    labels[seeds] = cv2.GC_PR_FGD
    labels[backdrop.border_inliers] = cv2.GC_BGD
    # The cores of wide backdrop-coloured regions are background for sure, so the
    # foreground colour model cannot creep into them (GrabCut otherwise fills
    # holes and grows blobs). Narrow ones, like a white logo, stay undecided.
    core_radius = max(1, round(_BACKDROP_CORE_FRACTION * max(z.shape)))
    labels[_erode(z < _BACKDROP_Z, core_radius)] = cv2.GC_BGD
    # Segment the residual, where the backdrop is a flat grey whatever its
    # gradient, so GrabCut's colour models need not learn the gradient. Noise is
    # stretched to a few grey levels (else the backdrop's colour model is so tight
    # that any noisy pixel looks like foreground) and large residuals compressed.
    stretch = 127.0 * backdrop.noise / _RESIDUAL_LEVELS_PER_NOISE
    flat = np.rint(128.0 + 127.0 * np.tanh(residual / stretch)).astype(np.uint8)
    # GrabCut's colour models start from k-means on OpenCV's RNG: seed it so the
    # same image always gets the same mask.
    cv2.setRNGSeed(0)
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
        # GrabCut refuses when a class has no samples, e.g. when the whole image
        # is border; the distance seeds are the best answer then.
        foreground = seeds
    return _drop_speckle(foreground)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return cv2.erode(mask.astype(np.uint8), _disc(radius)) > 0


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), _disc(radius)) > 0


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _drop_speckle(mask: np.ndarray) -> np.ndarray:
    """The mask without tiny foreground blobs and with tiny holes filled.

    A hole is background enclosed by foreground; background that reaches the
    image border is never filled.
    """
    min_area = max(2, round(_SPECKLE_FRACTION * mask.size))
    kept = mask & ~_small_components(mask, min_area, keep_border=False)
    return kept | _small_components(~kept, min_area, keep_border=True)


def _small_components(mask: np.ndarray, min_area: int, keep_border: bool) -> np.ndarray:
    """Pixels of the mask's 8-connected components smaller than ``min_area``.

    With ``keep_border`` set, components that touch the image border are left out.
    """
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    small = stats[:, cv2.CC_STAT_AREA] < min_area
    if keep_border:
        x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        right = x + stats[:, cv2.CC_STAT_WIDTH]
        bottom = y + stats[:, cv2.CC_STAT_HEIGHT]
        height, width = mask.shape
        small &= (x > 0) & (y > 0) & (right < width) & (bottom < height)
    small[0] = False  # label 0 is the mask's complement
    return small[labels]


def _mat_cutout_edges(
    rgb: np.ndarray, foreground: np.ndarray, backdrop_lab: np.ndarray
) -> np.ndarray:
    """Alpha at ``rgb``'s size: 255 inside, 0 outside, soft in the edge band.

    ``foreground`` is the hard mask and ``backdrop_lab`` the backdrop model, both
    at the (possibly smaller) segmentation size.
    """
    height, width = rgb.shape[:2]
    scale = max(height, width) / max(foreground.shape)
    upsampled = cv2.resize(
        foreground.astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_LINEAR
    )
    hard = upsampled >= 128
    # The band spans the segmentation's uncertainty (about one small-image pixel)
    # plus the width of a soft edge.
    radius = max(2, round(1.5 * scale) + 1)
    band = _dilate(hard, radius) & ~_erode(hard, radius)

    image = rgb.astype(np.float32)
    backdrop = cv2.resize(backdrop_lab, (width, height), interpolation=cv2.INTER_LINEAR)
    backdrop = cv2.cvtColor(backdrop, cv2.COLOR_Lab2RGB) * 255.0
    # The object's colour near the edge: the mean over nearby sure-inside pixels.
    inside = _erode(hard, radius).astype(np.float32)
    side = 8 * radius + 1
    weight = cv2.blur(inside, (side, side))
    colour = cv2.blur(image * inside[..., None], (side, side))
    colour /= np.maximum(weight, 1e-6)[..., None]

    # Compositing is linear (near enough in sRGB), so a pixel's alpha is where its
    # colour lies on the segment from the backdrop colour to the object colour.
    contrast = colour - backdrop
    contrast_sq = np.sum(contrast * contrast, axis=2)
    unmixed = np.sum((image - backdrop) * contrast, axis=2) / np.maximum(contrast_sq, 1e-6)
    unmixed = np.clip((unmixed - _ALPHA_SNAP) / (1.0 - 2 * _ALPHA_SNAP), 0.0, 1.0)
    # Where the colours are too alike to unmix (or no inside is near, as on thin
    # parts), a guided filter snaps the hard edge to the image's edges instead.
    guided = cv2.ximgproc.guidedFilter(image / 255.0, hard.astype(np.float32), radius, _GUIDED_EPS)
    has_inside = weight * side * side > 0.5
    unmixable = has_inside & (contrast_sq > _MIN_UNMIX_CONTRAST**2)
    soft = np.where(unmixable, unmixed, np.clip(guided, 0.0, 1.0))

    alpha = np.where(hard, 255, 0).astype(np.uint8)
    alpha[band] = np.rint(soft[band] * 255.0).astype(np.uint8)
    return alpha
