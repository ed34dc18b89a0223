#!/usr/bin/env python
"""How far the weights-free classic engines reach, on public images: a Markdown table.

    .venv/bin/python scripts/classic_engine_reach.py

Rows: scikit-image's bundled images (real photos, which come with no ground truth;
the horse silhouette, whose own pixels are its truth; the scikit-image logo, a flat
graphic) and the synthetic product shots and flat design of the test suite
(tests/images.py, which come with their true mask). Columns, for the classic cutout
engine: the share of the image's border its backdrop model fits and the colour spread
there (the two figures its warning is decided on, deployments/classic.py), the share of
the image it kept as foreground, the IoU against the truth where one exists, and
whether ``X-Engine-Warning`` would be sent; for the classic layer engine asked for 4
layers: how many came back with content, and whether the job's ``warning`` would be
set (serve_app/layer_jobs.py). docs/PERFORMANCE.md quotes the table.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployments import classic  # noqa: E402
from deployments.engine import LayerParams  # noqa: E402
from serve_app.exports import layer_info  # noqa: E402
from serve_app.layer_jobs import empty_layers_warning  # noqa: E402
from tests.images import flat_design, product_photo  # noqa: E402

LAYERS = 4
HEADER = ("| image | size | border fitted | colour spread (Lab) | kept as foreground | IoU vs truth "
          "| cutout warns | layers with content (of 4) | layer job warns |")


def _rgb(image: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 copy of a scikit-image array (grey, boolean or RGBA)."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def skimage_images() -> list[tuple[str, Callable[[], tuple[np.ndarray, np.ndarray | None]]]]:
    """(row name, a function giving the RGB image and its true foreground or None)."""
    from skimage import data

    def photo(name: str):
        return lambda: (_rgb(getattr(data, name)()), None)

    def horse():
        silhouette = data.horse()  # True: the white backdrop; False: the black horse
        return _rgb(silhouette), ~silhouette

    return [(f"skimage `{name}()` (photo)", photo(name)) for name in ("astronaut", "coffee", "chelsea", "rocket")] + [
        ("skimage `horse()` (silhouette on white)", horse),
        ("skimage `logo()` (flat graphic on white)", photo("logo")),
    ]


def synthetic_images() -> list[tuple[str, Callable[[], tuple[np.ndarray, np.ndarray | None]]]]:
    """The test suite's images with their truth (the flat design's: no single foreground)."""
    rows = [(f"product shot, {background} backdrop (tests/images.py)",
             lambda background=background: product_photo(1024, 768, background=background, seed=1))
            for background in ("plain", "gradient")]
    rows.append(("flat design (tests/images.py)", lambda: (flat_design(640, 480, seed=1)[0], None)))
    return rows


def border_fit(rgb: np.ndarray) -> tuple[float, float]:
    """(share of the border the backdrop model fits, its colour spread in Lab units),
    at the size the engine segments."""
    work = classic._fit_within(classic._fit_within(rgb, classic.ClassicCutoutEngine.info.max_side),
                               classic._CUTOUT_SEGMENT_SIDE)
    fit = classic._fit_border_backdrop(cv2.cvtColor(work.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab))
    return fit.border_share, fit.noise


def row(name: str, rgb: np.ndarray, truth: np.ndarray | None) -> str:
    """One table row: the cutout engine's figures, then the layer engine's."""
    ((mask, cutout_warning),) = classic.ClassicCutoutEngine().predict_with_warnings([rgb])
    share, spread = border_fit(rgb)
    kept = mask >= 128
    iou = f"{(kept & truth).sum() / (kept | truth).sum():.3f}" if truth is not None else "n/a"
    layers = classic.ClassicLayerEngine().decompose(rgb, LayerParams(layers=LAYERS))
    info = layer_info(layers, [f"Layer {i}" for i in range(1, len(layers) + 1)])
    with_content = sum(1 for layer in info if layer["bbox"] is not None)
    layer_warning = empty_layers_warning(info, "classic")
    return (f"| {name} | {rgb.shape[1]}x{rgb.shape[0]} | {share:.0%} | {spread:.1f} | {kept.mean():.0%} | "
            f"{iou} | {'yes' if cutout_warning else 'no'} | {with_content} | {'yes' if layer_warning else 'no'} |")


def main() -> int:
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|---|")
    for name, load in skimage_images() + synthetic_images():
        rgb, truth = load()
        print(row(name, rgb, truth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
