"""Synthetic test photos with a known ground truth.

``product_photo`` draws an e-commerce style shot: a shaded, textured mug with a
handle (whose hole shows the background) on a studio backdrop, with anti-aliased
edges, sensor noise, lens softness and a JPEG round trip; ``backdrop_photo`` is
the same shot with nothing on the backdrop. Both are deterministic for a given
set of arguments, so tests anywhere in the suite can share them.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

_SUPERSAMPLE = 4
# The mug body, as fractions of the frame: centre and half size.
_MUG_X, _MUG_Y, _MUG_HALF_W, _MUG_HALF_H = 0.46, 0.52, 0.15, 0.27
_MUG_COLOURS = [(38, 112, 166), (176, 52, 44), (58, 128, 72), (214, 150, 40), (92, 64, 140)]


def product_photo(
    width: int = 1024,
    height: int = 768,
    background: Literal["plain", "gradient"] = "plain",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A product shot and the object's true silhouette.

    Returns ``(rgb, true_mask)``: an HxWx3 uint8 RGB image and an HxW bool array
    that is True where the object covers at least half of a pixel. The mug's
    handle encloses a hole that is False in ``true_mask``. ``seed`` picks the
    mug colour and the noise.
    """
    rng = np.random.default_rng(seed)
    coverage = _mug_coverage(width, height)
    backdrop = _backdrop(width, height, background)
    mug = _shaded_mug(width, height, _MUG_COLOURS[seed % len(_MUG_COLOURS)], rng)
    alpha = coverage[..., None]
    rgb = alpha * mug + (1.0 - alpha) * backdrop
    return _photographic(rgb, rng), coverage >= 0.5


def backdrop_photo(
    width: int = 1024,
    height: int = 768,
    background: Literal["plain", "gradient"] = "plain",
    seed: int = 0,
) -> np.ndarray:
    """The backdrop of ``product_photo`` with nothing on it, photographed alike.

    Returns an HxWx3 uint8 RGB image; its true mask is all False.
    """
    return _photographic(_backdrop(width, height, background), np.random.default_rng(seed))


def _backdrop(width: int, height: int, background: str) -> np.ndarray:
    """A noiseless studio backdrop, HxWx3 float32 RGB in 0..255.

    ``plain`` is an even light grey; ``gradient`` is a sweep that darkens and cools
    towards the bottom, with a vignette, as a paper sweep under a top light does.
    """
    if background == "plain":
        return np.full((height, width, 3), (232.0, 231.0, 228.0), np.float32)
    if background != "gradient":
        raise ValueError(f"unknown background {background!r}")
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :, None]
    top = np.array((246.0, 244.0, 238.0), np.float32)
    bottom = np.array((168.0, 178.0, 196.0), np.float32)
    sweep = top + (bottom - top) * y
    vignette = 1.0 - 0.12 * (x**2 + (2 * y - 1) ** 2) / 2
    return sweep * vignette


def _mug_coverage(width: int, height: int) -> np.ndarray:
    """Fraction of each pixel the mug covers, from a supersampled drawing."""
    s = _SUPERSAMPLE
    canvas = np.zeros((height * s, width * s), np.uint8)
    cx, cy = _MUG_X * width * s, _MUG_Y * height * s
    half_w, half_h = _MUG_HALF_W * width * s, _MUG_HALF_H * height * s
    corner = 0.05 * min(width, height) * s
    _rounded_rect(canvas, cx - half_w, cy - half_h, cx + half_w, cy + half_h, corner)
    # The handle is a ring on the right side; its inner disc is background.
    hx, hy = cx + half_w, cy - 0.02 * height * s
    outer, inner = 0.13 * height * s, 0.075 * height * s
    handle = np.zeros_like(canvas)
    cv2.circle(handle, (round(hx), round(hy)), round(outer), 255, -1)
    cv2.circle(handle, (round(hx), round(hy)), round(inner), 0, -1)
    canvas = np.maximum(canvas, handle)
    small = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255.0


def _rounded_rect(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, r: float) -> None:
    x0, y0, x1, y1, r = (round(v) for v in (x0, y0, x1, y1, r))
    cv2.rectangle(canvas, (x0 + r, y0), (x1 - r, y1), 255, -1)
    cv2.rectangle(canvas, (x0, y0 + r), (x1, y1 - r), 255, -1)
    for cx, cy in ((x0 + r, y0 + r), (x1 - r, y0 + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
        cv2.circle(canvas, (cx, cy), r, 255, -1)


def _shaded_mug(
    width: int, height: int, colour: tuple[int, int, int], rng: np.random.Generator
) -> np.ndarray:
    """Mug surface: cylinder shading lit from the upper left, a highlight, glaze texture."""
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    u = (x - (2 * _MUG_X - 1)) / (2 * _MUG_HALF_W)  # -1..1 across the body
    shade = 0.55 + 0.5 * np.cos(np.clip(u + 0.35, -1.5, 1.5)) - 0.12 * y
    highlight = 0.5 * np.exp(-(((u + 0.45) / 0.07) ** 2))
    texture = cv2.GaussianBlur(rng.normal(0.0, 1.0, (height, width)).astype(np.float32), (0, 0), 6)
    texture *= 0.06 / max(float(texture.std()), 1e-6)
    base = np.array(colour, np.float32)
    surface = base * (shade + texture)[..., None] + 255.0 * highlight[..., None]
    return np.clip(surface, 0.0, 255.0)


def _photographic(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise, a little lens softness and a JPEG round trip."""
    noisy = rgb + rng.normal(0.0, 2.0, rgb.shape).astype(np.float32)
    soft = cv2.GaussianBlur(noisy, (0, 0), 0.6)
    img = np.clip(np.rint(soft), 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return np.ascontiguousarray(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1])


# Hand-checked palettes for ``flat_design``: background, circle, rectangle, triangle,
# text. No colour lies near the segment between two others, so edge pixels (mixes of
# two colours) never look like a third colour.
_FLAT_PALETTES = [
    [(242, 236, 222), (214, 64, 52), (38, 92, 168), (246, 182, 36), (28, 28, 36)],
    [(28, 40, 64), (236, 112, 44), (84, 180, 140), (236, 236, 240), (250, 210, 60)],
    [(236, 240, 244), (124, 58, 160), (40, 160, 200), (220, 60, 120), (40, 70, 40)],
]


def flat_design(
    width: int = 512,
    height: int = 384,
    seed: int = 0,
    background: Literal["plain", "gradient"] = "plain",
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A flat graphic (poster or logo style) and the visible extent of each shape.

    A plain background (or with ``background="gradient"``, one that shades from the
    palette's background colour at the top to a cooler one at the bottom) carries,
    back to front: a circle, a rectangle overlapping the
    circle's right side, a triangle overlapping the rectangle's lower right corner and
    a line of text-like marks (``cv2.putText`` strokes) along the top, each in its own
    flat colour, all anti-aliased (drawn at 4x and averaged down).

    Returns ``(rgb, masks)``: an HxWx3 uint8 RGB image and four HxW bool arrays,
    back to front (circle, rectangle, triangle, text), each True where that shape
    makes up at least half of the pixel's colour (so parts hidden under later
    shapes are False). ``seed`` picks the palette and nudges the layout.
    """
    rng = np.random.default_rng(seed)
    colours = _FLAT_PALETTES[seed % len(_FLAT_PALETTES)]
    s = _SUPERSAMPLE
    jx, jy = rng.uniform(-0.02, 0.02, 2)
    big_w, big_h, unit = width * s, height * s, min(width, height) * s

    def canvas() -> np.ndarray:
        return np.zeros((big_h, big_w), np.uint8)

    def point(fx: float, fy: float) -> tuple[int, int]:
        return round((fx + jx) * big_w), round((fy + jy) * big_h)

    circle = canvas()
    cv2.circle(circle, point(0.30, 0.52), round(0.27 * unit), 255, -1)
    rectangle = canvas()
    cv2.rectangle(rectangle, point(0.44, 0.36), point(0.74, 0.78), 255, -1)
    triangle = canvas()
    corners = np.array([point(0.60, 0.94), point(0.92, 0.94), point(0.80, 0.58)], np.int32)
    cv2.fillPoly(triangle, [corners], 255)
    text = canvas()
    # Cap height about 9% of the shorter side, strokes about 1.1% (2.6 pixels at 240).
    scale = 0.09 * unit / 22.0
    cv2.putText(text, "STRATA 24", point(0.06, 0.27), cv2.FONT_HERSHEY_SIMPLEX, scale, 255,
                max(1, round(0.011 * unit)), cv2.LINE_8)

    coverages = [
        cv2.resize(shape, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        for shape in (circle, rectangle, triangle, text)
    ]
    rgb = np.empty((height, width, 3), np.float32)
    rgb[:] = colours[0]
    if background == "gradient":
        shade = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        cool = np.array(colours[0], np.float32) * 0.8 + np.array((0.0, 20.0, 50.0), np.float32)
        rgb = rgb + shade * (cool - rgb)
    elif background != "plain":
        raise ValueError(f"unknown background {background!r}")
    for coverage, colour in zip(coverages, colours[1:]):
        c = coverage[..., None]
        rgb = c * np.array(colour, np.float32) + (1.0 - c) * rgb
    masks = []
    for k, coverage in enumerate(coverages):
        visible = coverage.copy()
        for above in coverages[k + 1:]:
            visible *= 1.0 - above
        masks.append(visible >= 0.5)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), masks
