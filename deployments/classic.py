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

``ClassicLayerEngine`` splits flat graphics (posters, logos, UI) into layers by
palette, without any model weights:

1. Palette: colours of flat pixels (the same as both neighbours along some
   direction, so anti-aliased edge pixels do not count) are histogrammed and their
   dominant modes picked in Lab; a rare mode that is a mix of two common ones (an
   edge along a pixel row) is dropped.
2. Colour groups: every pixel takes its nearest palette colour; palette colours
   that meet without an edge (the pieces of a gradient) become one group.
3. Each group's colour is estimated at every pixel from its nearby pure pixels
   (push-pull interpolation), and where it is present (near its flat pixels).
4. Order: the group covering most of the border is the background (the largest
   group when the border is transparent); the others go back to front by
   occlusion votes where two groups meet (the occluder's side, a convex shape, a
   corner or a stroke, covers less of a window around the meeting point; windows
   with a third group, as at T-junctions, do not vote), the larger group first
   where the votes say nothing. Groups beyond ``params.layers`` merge into a
   neighbour in that order, smallest first; layers left over stay transparent.
5. Edge pixels are unmixed: each is explained as a pure colour or as the upper
   of two present groups over the lower at some alpha; the upper layer gets that
   alpha, the lower one is opaque there. An image that is mostly edges (a photo)
   is not unmixed: each pixel goes as it is to its group's layer.
6. Layers: the background layer is opaque wherever the input is (filled behind
   shapes with its estimated colour); the upper colour of every unmixed pixel is
   solved from the input so that stacking gives the input back up to rounding,
   and pixels nothing explains stay opaque, as they are, in the uppermost layer
   of the groups present there. Partly transparent input pixels go, as they are,
   to their group's layer only.

Lower layers hold only what shows of them (nothing is completed under shapes but
the background). An occluder whose edge crosses a shape in a straight line, with
no corner or bulge inside it, gives no vote, so their order then follows size.
Posters with photos, soft shadows or blurred edges stack back as exactly, but their
layers are less meaningful (smooth transitions merge colours into one group).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from deployments.engine import (
    DecompositionCancelled,
    EngineInfo,
    LayerEngine,
    LayerParams,
    SegmentationEngine,
)

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
# The backdrop model fits a plain or gradient backdrop's whole border to its noise; a
# photo's busy surroundings leave much of the border unfitted, or a wide colour spread
# even where they fit. Measured (scripts/classic_engine_reach.py): product shots on plain
# and gradient backdrops fit 100 % of the border with a spread at the 1.0 floor; the
# scikit-image photos fit 43-90 % or spread 4-10 Lab units.
_FIT_MIN_BORDER_SHARE = 0.8
_FIT_MAX_NOISE_LAB = 3.0
# Unmixed alpha within this of 0 or 1 is texture or noise, not a partial pixel.
_ALPHA_SNAP = 0.06
_GUIDED_EPS = 1e-3


@dataclass(frozen=True)
class _BackdropFit:
    """A backdrop colour model evaluated on an image's pixel grid."""

    lab: np.ndarray  # HxWx3 float32, the predicted backdrop in Lab
    noise: float  # median distance of a border pixel from the model, Lab units
    border_inliers: np.ndarray  # HxW bool, border pixels that fit the model
    border_share: float  # the fraction of the border band's pixels that fit it


class ClassicCutoutEngine(SegmentationEngine):
    """Background removal for product shots on plain or gradient backdrops.

    Deterministic: the same image always gets the same mask. Where its backdrop model
    does not fit an image's border (a photo's busy surroundings), the image's warning
    (``predict_with_warnings``) says so.
    """

    about = ("weights-free: made for product shots on plain or gradient backdrops, "
             "not for photos with busy backgrounds")

    info = EngineInfo(engine="classic", device="cpu", dtype="uint8", max_side=1024)

    def load(self) -> None:
        """Nothing to load: the engine has no weights."""

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One alpha mask per image, HxW uint8, 255 = foreground.

        Images larger than ``info.max_side`` are processed at that size and their
        masks scaled back up.
        """
        return [mask for mask, _ in self.predict_with_warnings(images)]

    def predict_with_warnings(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, str | None]]:
        """Masks, each with a warning where the backdrop model fits the image poorly."""
        return [self._cutout(image) for image in images]

    def _cutout(self, image: np.ndarray) -> tuple[np.ndarray, str | None]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            return np.zeros((height, width), np.uint8), None
        work = _fit_within(image, self.info.max_side)
        small = _fit_within(work, _CUTOUT_SEGMENT_SIDE)
        lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
        backdrop = _fit_border_backdrop(lab)
        warning = _poor_fit_warning(backdrop)
        foreground = _segment_cutout(lab, backdrop)
        if not foreground.any():
            return np.zeros((height, width), np.uint8), warning
        alpha = _mat_cutout_edges(work, foreground, backdrop.lab)
        if alpha.shape != (height, width):
            alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_LINEAR)
        return alpha, warning


def _poor_fit_warning(backdrop: _BackdropFit) -> str | None:
    """What to tell the user when the backdrop model does not fit the image's border."""
    if backdrop.border_share >= _FIT_MIN_BORDER_SHARE and backdrop.noise <= _FIT_MAX_NOISE_LAB:
        return None
    return (f"the classic engine is made for plain or gradient backdrops and this image's is not one "
            f"({backdrop.border_share:.0%} of its border fits a smooth backdrop, colour spread "
            f"{backdrop.noise:.1f} Lab units): the cutout is likely wrong; photos need BiRefNet or RMBG-2.0")


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
    return _BackdropFit(predicted.astype(np.float32), noise, border_inliers,
                        float(border_inliers.sum()) / max(samples, 1))


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


# --- Layer decomposition ------------------------------------------------------

# Progress steps of one decomposition: palette, colour groups, local colours, order,
# unmixing, layers.
_LAYER_STEPS = 6
# Neighbouring pixels whose channels all differ by at most this many levels show the
# same colour.
_FLAT_LEVELS = 6
# Colours closer than this (CIE76 Delta E) make one palette entry.
_PALETTE_RADIUS = 8.0
# A palette entry needs this share of the sampled flat pixels, and this many of them.
_PALETTE_MIN_SHARE = 0.001
_PALETTE_MIN_PIXELS = 12
_PALETTE_MAX = 16
_PALETTE_TRIES = 64
_PALETTE_SAMPLE = 400_000
# An entry within this many RGB levels of the segment between two entries each more
# than 1/_MIX_ENTRY_RATIO times as common is a mix of those two (an edge along a
# pixel row or column), not a colour of its own.
_MIX_ENTRY_LEVELS = 10.0
_MIX_ENTRY_RATIO = 0.25
# Colour look-up tables quantise each channel to this many bits.
_LUT_BITS = 6
# Pixels this close (Delta E) to their palette colour are pure.
_PURE_DELTA_E = 3.0
# Two palette colours whose pixels meet with steps of at most _SOFT_STEP_LEVELS (no
# edge between them) over a length of _SOFT_MIN_FRACTION of the longer side (and
# at least _SOFT_MIN_PAIRS pixels) are pieces of one smooth surface, a gradient.
# Where two flat colours meet at an edge, however anti-aliased, the colour steps
# where the nearest colour changes. (Where they meet at an edge too says nothing:
# those are edge pixels that a third colour's mix makes look like one of them.)
_SOFT_STEP_LEVELS = 6
_SOFT_MIN_FRACTION = 0.03
_SOFT_MIN_PAIRS = 4
# A group is present within this many pixels of its flat pixels; for pixels that
# the groups present so near do not explain, within _WIDE_PRESENCE_RADIUS.
_PRESENCE_RADIUS = 2
_WIDE_PRESENCE_RADIUS = 8
# Push-pull trusts a coarse cell fully once this share of it is known.
_PULL_FULL_SHARE = 0.25
# Occlusion votes look at a window this fraction of the longer side wide. Summed
# votes under _ORDER_MIN_VOTE times the window's width say nothing (a straight edge
# gives none either way; an occluder's corner about a quarter of the width).
_ORDER_WINDOW_FRACTION = 0.02
_ORDER_MIN_VOTE = 0.1
# A group covering more than this share of the window takes part there.
_ORDER_OTHER_SHARE = 0.02
# At most this many pairs of neighbours vote (an even sample of them).
_ORDER_MAX_PAIRS = 200_000
# Two colours closer than this (RGB levels) are not unmixed against each other.
_UNMIX_MIN_CONTRAST = 12.0
# Unmixed alpha within this of 0 or 1 is an opaque pixel of one colour.
_UNMIX_SNAP = 0.04
# Pixels further than this (RGB levels) from any pure colour or mix are left as
# they are, opaque in the uppermost present group's layer.
_UNMIX_MAX_RESIDUAL = 24.0
# A pair must beat a pure colour by this much (RGB levels) to be chosen.
_UNMIX_PAIR_MARGIN = 0.5
# Images with more than this share of their pixels to unmix are not unmixed.
_BUSY_SHARE = 0.5


@dataclass(frozen=True)
class _Palette:
    lab: np.ndarray  # Kx3 float32
    rgb: np.ndarray  # Kx3 float32
    weight: np.ndarray  # K, pixels sampled per entry


class _Progress:
    """Counts steps and reports them; raises DecompositionCancelled when told to stop."""

    def __init__(self, on_step: Callable[[int, int], bool] | None, total: int):
        self.on_step, self.total, self.step = on_step, total, 0

    def __call__(self) -> None:
        self.step += 1
        if self.on_step is not None and self.on_step(self.step, self.total) is False:
            raise DecompositionCancelled(f"cancelled at step {self.step} of {self.total}")


class ClassicLayerEngine(LayerEngine):
    """Palette layer decomposition for flat graphics (posters, logos, UI).

    Works at the input's size in ``_LAYER_STEPS`` progress steps. Deterministic:
    ``params.seed`` (like ``resolution``, ``steps``, ``prompt`` and
    ``true_cfg_scale``) is ignored. With fewer colour groups than
    ``params.layers``, the layers above the last group are fully transparent.
    """

    info = EngineInfo(engine="classic", device="cpu", dtype="uint8")
    about = "weights-free: made for flat graphics (posters, logos, UI), not for photos"

    def load(self) -> None:
        """Nothing to load: the engine has no weights."""

    def decompose(
        self,
        image: np.ndarray,
        params: LayerParams,
        on_step: Callable[[int, int], bool] | None = None,
    ) -> list[np.ndarray]:
        """``params.layers`` HxWx4 uint8 RGBA layers, background first.

        Stacked alpha-over (first at the bottom) they give ``image`` back, up to
        rounding. The background layer is opaque wherever ``image`` is. An HxWx3
        image counts as opaque.
        """
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx4 uint8 image, got {image.shape} {image.dtype}")
        if params.layers < 1:
            raise ValueError(f"layers must be at least 1, got {params.layers}")
        if image.shape[2] == 3:
            image = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
        return _decompose(image, int(params.layers), _Progress(on_step, _LAYER_STEPS))


def _decompose(rgba: np.ndarray, count: int, progress: _Progress) -> list[np.ndarray]:
    height, width = rgba.shape[:2]
    rgb = np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3]
    opaque = alpha == 255
    visible = alpha > 0

    # 1. Palette, from flat opaque pixels (or whatever shows, lacking those).
    flat_directions = _flat_directions(rgb) * opaque
    flat = flat_directions >= 1
    sample = next((m for m in (flat, opaque, visible) if m.any()), None)
    if sample is None:  # nothing shows: every layer is transparent
        for _ in range(_LAYER_STEPS):
            progress()
        return [np.zeros((height, width, 4), np.uint8) for _ in range(count)]
    palette = _find_palette(rgb[sample])
    progress()

    # 2. Colour groups.
    lut_label, lut_distance = _palette_lut(palette.lab)
    index = _lut_index(rgb)
    label = lut_label[index]
    group_of = _merge_smooth_neighbours(rgb, label, opaque, len(palette.lab))
    groups = group_of[label]
    n_groups = int(group_of.max()) + 1
    progress()

    # 3. Where each group is, and its colour near there.
    # Pure: flat in two directions (inside a flat area or gradient; a straight
    # anti-aliased edge is flat along itself only), or in one and near a palette
    # colour (a stroke's core). Faint edge pixels near a colour are unmixed.
    pure = (flat_directions >= 2) | (flat & (lut_distance[index] < _PURE_DELTA_E))
    areas = np.bincount(groups[visible], minlength=n_groups)
    weights, cores, nears = [], [], []
    accepted = np.zeros((height, width), bool)
    for g in range(n_groups):
        member = groups == g
        weight = member & pure
        core = member & flat
        if not core.any():
            core = weight
        near = _dilate(core, _PRESENCE_RADIUS) if core.any() else np.zeros_like(core)
        accepted |= weight & near
        weights.append(weight)
        cores.append(core)
        nears.append(near)
    background = _background_group(groups, pure, areas)
    # The pixels to unmix: edges. Where most pixels are (a photo, noise), the image
    # is no flat graphic: every pixel then goes as it is to its group's layer.
    where = np.flatnonzero(opaque & ~accepted)
    if len(where) > _BUSY_SHARE * np.count_nonzero(opaque):
        where = where[:0]
    colours = rgb.reshape(-1, 3)[where].astype(np.float32)
    present = np.stack([near.ravel()[where] for near in nears], axis=1)
    estimates = np.zeros((len(where), n_groups, 3), np.float32)
    image = rgb.astype(np.float32)
    background_fill = None
    for g, weight in enumerate(weights):
        if g == background and not weight.any():  # no pure pixels: fill from all of it
            weight = (groups == g) & visible
        if not weight.any() or (g != background and not len(where)):
            continue
        estimate = _push_pull(image, weight)
        estimates[:, g] = estimate.reshape(-1, 3)[where]
        if g == background:
            background_fill = estimate
    progress()

    # 4. Order back to front, and which layer each group goes to.
    window = max(3, round(_ORDER_WINDOW_FRACTION * max(height, width)) | 1)
    votes = _occlusion_votes(np.where(opaque, groups, -1), n_groups, window)
    order = _order_groups(background, votes, _ORDER_MIN_VOTE * window, areas)
    layer_of = _assign_layers(order, areas, count)
    progress()

    # 5. Unmix the edge pixels; those left unexplained again with the groups present
    # farther away (a shape's thin tip has no flat pixels nearby), then as they are.
    top, under, amount, cost = _unmix(colours, estimates, present, layer_of)
    lost = np.flatnonzero(cost > _UNMIX_MAX_RESIDUAL)
    if len(lost):
        at = where[lost]
        wide = np.stack(
            [_dilate(core, _WIDE_PRESENCE_RADIUS).ravel()[at] for core in cores], axis=1
        )
        retry = _unmix(colours[lost], estimates[lost], wide, layer_of)
        better = retry[3] < cost[lost]
        for old, new in zip((top, under, amount, cost), retry):
            old[lost[better]] = new[better]
        present = present.copy()
        present[lost] = wide
    # Pixels nothing explains (where three colours meet, say) show as they are on
    # top of the groups present, so the layers under them stay clean.
    lost = cost > _UNMIX_MAX_RESIDUAL
    uppermost = np.argmax(np.where(present, layer_of[None, :], -1), axis=1)
    own = groups.ravel()[where]
    top[lost] = np.where(present[lost].any(axis=1), uppermost[lost], own[lost])
    under[lost], amount[lost] = -1, 1.0
    progress()

    # 6. Layers.
    layers = _assemble_layers(
        rgba, groups, layer_of, count, background_fill, where, top, under, amount, estimates
    )
    progress()
    return layers


def _flat_directions(rgb: np.ndarray) -> np.ndarray:
    """In how many of 4 directions (2 axes, 2 diagonals) each pixel shows the same
    colour as both its neighbours (HxW uint8).

    Inside flat areas and gradients, all; along a stroke's core, at least one;
    anti-aliased edge pixels (mixes that change across the edge) none, or one for
    an edge that runs straight along a row, column or diagonal.
    """
    height, width = rgb.shape[:2]
    flat = np.zeros((height, width), np.uint8)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        here, there = _neighbour_slices(height, width, dy, dx)
        if height <= dy or width <= abs(dx):
            continue
        # ahead[y, x]: the pixel matches its neighbour at (y + dy, x + dx).
        ahead = np.zeros((height, width), bool)
        ahead[here] = _max_channel(cv2.absdiff(rgb[here], rgb[there])) <= _FLAT_LEVELS
        # ... and the one at (y - dy, x - dx) matches it.
        behind = np.zeros((height, width), bool)
        behind[there] = ahead[here]
        flat += ahead & behind
    return flat


def _neighbour_slices(height: int, width: int, dy: int, dx: int) -> tuple[tuple, tuple]:
    """Slices of the pixels that have a neighbour at (+dy, +dx), and of those neighbours."""
    if dx >= 0:
        xs, xn = slice(0, width - dx), slice(dx, width)
    else:
        xs, xn = slice(-dx, width), slice(0, width + dx)
    return (slice(0, height - dy), xs), (slice(dy, height), xn)


def _max_channel(image: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])


def _lut_index(rgb: np.ndarray) -> np.ndarray:
    """Index of each colour's cell in the quantised RGB cube (same shape less the channels)."""
    shift = 8 - _LUT_BITS
    q = (rgb >> shift).astype(np.int32)
    return (q[..., 0] << (2 * _LUT_BITS)) | (q[..., 1] << _LUT_BITS) | q[..., 2]


@functools.cache
def _lut_cell_lab() -> np.ndarray:
    """Lab of the centre of every cell of the quantised RGB cube, (cells)x3 float32."""
    step = 1 << (8 - _LUT_BITS)
    levels = np.arange(1 << _LUT_BITS, dtype=np.float32) * step + (step - 1) / 2.0
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    return _rgb_to_lab(np.stack([r.ravel(), g.ravel(), b.ravel()], axis=1))


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Lab (L 0..100) of RGB colours in 0..255, any shape ending in 3."""
    flat = (np.asarray(rgb, np.float32) / 255.0).reshape(-1, 1, 3)
    return cv2.cvtColor(flat, cv2.COLOR_RGB2Lab).reshape(np.shape(rgb))


def _find_palette(pixels: np.ndarray) -> _Palette:
    """The dominant colours of ``pixels`` (Nx3 uint8), most common first.

    Greedy mode seeking on a histogram of quantised colours: the fullest cell
    seeds a mode, mean shift (in Lab, radius _PALETTE_RADIUS) centres it, and the
    cells within the radius are claimed. Modes with too few pixels are skipped.
    """
    if len(pixels) > _PALETTE_SAMPLE:
        pixels = pixels[:: -(-len(pixels) // _PALETTE_SAMPLE)]
    index = _lut_index(pixels)
    size = 1 << (3 * _LUT_BITS)
    counts = np.bincount(index, minlength=size)
    cells = np.flatnonzero(counts)
    n = counts[cells].astype(np.float64)
    cell_rgb = np.stack(
        [np.bincount(index, weights=pixels[:, c], minlength=size)[cells] for c in range(3)], axis=1
    ) / n[:, None]
    cell_lab = _rgb_to_lab(cell_rgb).astype(np.float64)
    min_pixels = max(_PALETTE_MIN_PIXELS, _PALETTE_MIN_SHARE * n.sum())

    remaining = n.copy()
    modes: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(_PALETTE_TRIES):
        if len(modes) >= _PALETTE_MAX or not remaining.any():
            break
        centre = cell_lab[np.argmax(remaining)]
        for _ in range(4):
            near = (remaining > 0) & (np.sum((cell_lab - centre) ** 2, axis=1) < _PALETTE_RADIUS**2)
            centre = np.average(cell_lab[near], axis=0, weights=remaining[near])
        near = (remaining > 0) & (np.sum((cell_lab - centre) ** 2, axis=1) < _PALETTE_RADIUS**2)
        near[np.argmax(remaining)] = True
        total = remaining[near].sum()
        mode_rgb = np.average(cell_rgb[near], axis=0, weights=remaining[near])
        remaining[near] = 0
        if total >= min_pixels or not modes and not remaining.any():
            modes.append((centre, mode_rgb, total))
    if not modes:  # no colour is common: take the most common cell
        best = np.argmax(n)
        modes.append((cell_lab[best], cell_rgb[best], n[best]))

    modes.sort(key=lambda mode: -mode[2])
    kept: list[tuple[np.ndarray, np.ndarray, float]] = []
    for mode in modes:
        if not _is_mix_of(mode, kept):
            kept.append(mode)
    return _Palette(
        lab=np.array([m[0] for m in kept], np.float32),
        rgb=np.array([m[1] for m in kept], np.float32),
        weight=np.array([m[2] for m in kept], np.float64),
    )


def _is_mix_of(mode, kept) -> bool:
    """Whether ``mode``'s colour is a blend of two far more common kept colours."""
    colour, weight = mode[1], mode[2]
    for i, (_, a, wa) in enumerate(kept):
        for _, b, wb in kept[i + 1 :]:
            if weight >= _MIX_ENTRY_RATIO * min(wa, wb):
                continue
            d = b - a
            t = float(np.dot(colour - a, d) / max(float(np.dot(d, d)), 1e-6))
            if 0.05 < t < 0.95 and np.linalg.norm(a + t * d - colour) < _MIX_ENTRY_LEVELS:
                return True
    return False


def _palette_lut(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette entry and its Delta E for every cell of the quantised RGB cube."""
    cells = _lut_cell_lab()
    distance = (
        np.sum(cells * cells, axis=1)[:, None]
        - 2.0 * cells @ lab.T
        + np.sum(lab * lab, axis=1)[None]
    )
    nearest = np.argmin(distance, axis=1).astype(np.int32)
    best = np.take_along_axis(distance, nearest[:, None], axis=1)[:, 0]
    return nearest, np.sqrt(np.maximum(best, 0.0))


def _merge_smooth_neighbours(
    rgb: np.ndarray, label: np.ndarray, valid: np.ndarray, n_labels: int
) -> np.ndarray:
    """Group id (0..G-1) per palette entry; entries that meet without an edge share one."""
    height, width = label.shape
    smooth = np.zeros(n_labels * n_labels, np.int64)
    for dy, dx in ((0, 1), (1, 0)):
        here, there = _neighbour_slices(height, width, dy, dx)
        if height <= dy or width <= dx:
            continue
        a, b = label[here], label[there]
        meet = valid[here] & valid[there] & (a != b)
        if not meet.any():
            continue
        step = _max_channel(cv2.absdiff(rgb[here], rgb[there]))[meet]
        key = np.minimum(a[meet], b[meet]) * n_labels + np.maximum(a[meet], b[meet])
        smooth += np.bincount(key[step <= _SOFT_STEP_LEVELS], minlength=smooth.size)
    parent = list(range(n_labels))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    min_pairs = max(_SOFT_MIN_PAIRS, _SOFT_MIN_FRACTION * max(height, width))
    for key in np.flatnonzero(smooth >= min_pairs):
        a, b = root(int(key) // n_labels), root(int(key) % n_labels)
        parent[max(a, b)] = min(a, b)
    roots = [root(i) for i in range(n_labels)]
    ids = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return np.array([ids[r] for r in roots], np.int32)


def _background_group(groups: np.ndarray, pure: np.ndarray, areas: np.ndarray) -> int:
    """The group covering most of the border (of its pure pixels); else the largest."""
    height, width = groups.shape
    band = max(1, round(0.01 * max(height, width)))
    border = np.ones((height, width), bool)
    border[band:-band, band:-band] = False
    border &= pure
    if border.any():
        return int(np.argmax(np.bincount(groups[border], minlength=len(areas))))
    return int(np.argmax(areas))


def _push_pull(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    """``image`` (HxWx3 float32) where ``known``, smoothly filled in from the nearest
    known pixels elsewhere (push-pull over an image pyramid)."""
    weight = known.astype(np.float32)
    level = np.dstack([image * weight[..., None], weight])
    pyramid = [level]
    while max(level.shape[:2]) > 1:
        h, w = level.shape[:2]
        level = cv2.resize(level, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)
        level = level.reshape(level.shape[0], level.shape[1], 4)
        pyramid.append(level)
    top = pyramid[-1]
    estimate = top[..., :3] / max(float(top[0, 0, 3]), 1e-12)
    for level in reversed(pyramid[1:-1]):
        h, w = level.shape[:2]
        up = cv2.resize(estimate, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, 3)
        share = level[..., 3:]
        colour = level[..., :3] / np.maximum(share, 1e-12)
        trust = np.minimum(share / _PULL_FULL_SHARE, 1.0)
        estimate = trust * colour + (1.0 - trust) * up
    h, w = image.shape[:2]
    if len(pyramid) > 1:
        up = cv2.resize(estimate, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, 3)
    else:
        up = np.broadcast_to(estimate, image.shape)
    return np.where(known[..., None], image, up)


def _occlusion_votes(groups: np.ndarray, n_groups: int, window: int) -> np.ndarray:
    """Evidence, per pair of groups, that the first lies on top of the second.

    ``groups`` is each pixel's group (-1 where it is not opaque). Where groups i
    and j meet, the one covering less of the window around the meeting point bulges
    into the other there (a convex shape, a corner or a stroke over what it hides),
    so it likely lies on top. ``votes[i, j]`` sums (coverage_j - coverage_i) /
    (coverage_i + coverage_j) over both pixels of every pair of 4-neighbours, one
    in each group (antisymmetric, so a straight edge sums to about 0). Only pairs
    whose windows hold a share of both groups and of no third one count: at a
    T-junction, where an edge ends against an occluder's edge, the occluder covers
    the larger share; and a stray pixel (an edge pixel whose blend resembles some
    other colour) is no shape.
    """
    height, width = groups.shape
    firsts, seconds = [], []
    flat_index = np.arange(height * width).reshape(height, width)
    for dy, dx in ((0, 1), (1, 0)):
        here, there = _neighbour_slices(height, width, dy, dx)
        if height <= dy or width <= dx:
            continue
        a, b = groups[here], groups[there]
        meet = (a >= 0) & (b >= 0) & (a != b)
        firsts.append(flat_index[here][meet])
        seconds.append(flat_index[there][meet])
    if not sum(len(f) for f in firsts):
        return np.zeros((n_groups, n_groups))
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    # A busy image (a photo) meets everywhere: an even sample of the pairs will do.
    stride = -(-len(first) // _ORDER_MAX_PAIRS)
    first, second = first[::stride], second[::stride]
    coverage = [cv2.blur((groups == g).astype(np.float32), (window, window)).ravel()
                for g in range(n_groups)]
    i, j = groups.ravel()[first], groups.ravel()[second]
    keep = np.ones(len(first), bool)
    shares = []
    for pixel in (first, second):
        share = np.stack([c[pixel] for c in coverage], axis=1)
        part = share > _ORDER_OTHER_SHARE
        rows = np.arange(len(pixel))
        keep &= part[rows, i] & part[rows, j] & (part.sum(axis=1) == 2)
        shares.append((share[rows, i], share[rows, j]))
    vote = np.zeros(len(first))
    for ci, cj in shares:
        vote += (cj - ci) / (ci + cj + 1e-6)
    key = (i * n_groups + j)[keep]
    total = np.bincount(key, weights=vote[keep] * stride, minlength=n_groups * n_groups)
    votes = total.reshape(n_groups, n_groups)
    return votes - votes.T


def _order_groups(
    background: int, votes: np.ndarray, min_vote: float, areas: np.ndarray
) -> list[int]:
    """Groups back to front: the background, then repeatedly the group with the
    lowest count of the rest it lies on, less the count lying on it (clear votes
    only); the larger group on a tie."""
    wins = np.where(np.abs(votes) >= min_vote, np.sign(votes), 0.0)
    order = [background]
    remaining = [g for g in range(len(areas)) if g != background]
    while remaining:
        rest = np.array(remaining)
        score = wins[np.ix_(rest, rest)].sum(axis=1)
        tied = rest[score == score.min()]
        pick = int(tied[np.argmax(areas[tied])])
        order.append(pick)
        remaining.remove(pick)
    return order


def _assign_layers(order: list[int], areas: np.ndarray, count: int) -> np.ndarray:
    """Layer index per group: one group a layer in ``order`` while they fit, else the
    smallest group (never the background) merges into its smaller neighbour in the
    order, until ``count`` layers remain."""
    slots = [[g] for g in order]
    sizes = [int(areas[g]) for g in order]
    while len(slots) > count:
        k = 1 + int(np.argmin(sizes[1:]))
        neighbours = [n for n in (k - 1, k + 1) if 1 <= n < len(slots)]
        target = min(neighbours, key=lambda n: sizes[n]) if neighbours else 0
        slots[target] += slots[k]
        sizes[target] += sizes[k]
        del slots[k], sizes[k]
    layer_of = np.zeros(len(order), np.int32)
    for layer, slot in enumerate(slots):
        layer_of[slot] = layer
    return layer_of


def _unmix(
    colours: np.ndarray, estimates: np.ndarray, present: np.ndarray, layer_of: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Explain each edge pixel by the present groups.

    Returns ``(top, under, amount, cost)``: the group on top; the group opaque
    under it (-1 for none: the top group is then opaque, showing the pixel as it
    is); the top group's alpha; and how far (RGB levels) the explanation is from
    the pixel (inf where no group is present). The pixel is a pure colour, or a
    blend of an upper and a lower group in different layers (alpha = its position
    between their colours).
    """
    n, n_groups = present.shape
    best = np.full(n, np.inf, np.float32)
    top = np.zeros(n, np.int32)
    under = np.full(n, -1, np.int32)
    amount = np.ones(n, np.float32)
    for g in range(n_groups):
        rows = np.flatnonzero(present[:, g])
        cost = np.linalg.norm(colours[rows] - estimates[rows, g], axis=1)
        better = cost < best[rows]
        rows = rows[better]
        best[rows], top[rows], under[rows], amount[rows] = cost[better], g, -1, 1.0
    for i in range(n_groups):
        for j in range(i + 1, n_groups):
            rows = np.flatnonzero(present[:, i] & present[:, j])
            if not len(rows):
                continue
            upper, lower = (i, j) if layer_of[i] >= layer_of[j] else (j, i)
            low = estimates[rows, lower]
            span = estimates[rows, upper] - low
            span_sq = np.sum(span * span, axis=1)
            along = np.sum((colours[rows] - low) * span, axis=1)
            t = np.clip(along / np.maximum(span_sq, 1e-6), 0.0, 1.0)
            cost = np.linalg.norm(colours[rows] - low - t[:, None] * span, axis=1)
            cost[span_sq < _UNMIX_MIN_CONTRAST**2] = np.inf
            better = cost + _UNMIX_PAIR_MARGIN < best[rows]
            rows, t = rows[better], t[better]
            best[rows], top[rows] = cost[better], upper
            if layer_of[upper] == layer_of[lower]:  # one layer: shown as it is
                under[rows], amount[rows] = -1, 1.0
            else:
                under[rows], amount[rows] = lower, t
    mixed = under >= 0
    faint = mixed & (amount < _UNMIX_SNAP)
    top[faint] = under[faint]
    solid = mixed & (amount > 1.0 - _UNMIX_SNAP)
    under[faint | solid], amount[faint | solid] = -1, 1.0
    return top, under, amount, best


def _assemble_layers(
    rgba: np.ndarray,
    groups: np.ndarray,
    layer_of: np.ndarray,
    count: int,
    background_fill: np.ndarray | None,
    where: np.ndarray,
    top: np.ndarray,
    under: np.ndarray,
    amount: np.ndarray,
    estimates: np.ndarray,
) -> list[np.ndarray]:
    """The RGBA layers, given each pixel's top group (its own group off the edges)
    and, on unmixed edge pixels, the group under it and the top's alpha."""
    height, width = rgba.shape[:2]
    pixels = rgba.reshape(-1, 4)
    top_layer = np.where(pixels[:, 3] > 0, layer_of[groups.ravel()], -1)
    top_layer[where] = layer_of[top]
    top_rgba = pixels.copy()

    # Blends: the lower colour (as the lower layer will hold it) is fixed, and the
    # upper one solved from the input, raising alpha where the solution would leave
    # 0..255, so that stacking gives the input back.
    mixed = np.flatnonzero(under >= 0)
    at = where[mixed]
    lower = np.clip(np.rint(estimates[mixed, under[mixed]]), 0, 255)
    target = pixels[at, :3].astype(np.float32)
    diff = target - lower
    # Over `lower`, alpha a shows lower + a * (upper - lower): reaching the target
    # with upper inside 0..255 takes a >= |diff| / (room from lower to 0 or 255).
    room = np.where(diff > 0, 255.0 - lower, lower)
    need = (np.abs(diff) / np.maximum(room, 1e-6)).max(axis=1, initial=0.0)
    alpha = np.clip(np.ceil(np.maximum(amount[mixed], need) * 255.0 - 1e-3), 1, 255)
    upper = np.clip(np.rint(lower + diff * (255.0 / alpha[:, None])), 0, 255)
    top_rgba[at, :3] = upper.astype(np.uint8)
    top_rgba[at, 3] = alpha.astype(np.uint8)
    under_layer = layer_of[under[mixed]]

    opaque = pixels[:, 3] == 255
    layers = []
    for layer in range(count):
        base = np.zeros((height * width, 4), np.uint8)
        if layer == 0 and background_fill is not None:  # opaque behind everything
            fill = np.clip(np.rint(background_fill.reshape(-1, 3)), 0, 255).astype(np.uint8)
            base[opaque, :3] = fill[opaque]
            base[opaque, 3] = 255
        out = np.where((top_layer == layer)[:, None], top_rgba, base)
        below = under_layer == layer
        out[at[below], :3] = lower[below].astype(np.uint8)
        out[at[below], 3] = 255
        layers.append(out.reshape(height, width, 4))
    return layers
