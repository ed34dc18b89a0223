#!/usr/bin/env python
"""How far the weights-free classic cutout engine reaches, on public images: a Markdown table.

    python scripts/classic_engine_reach.py

Rows: scikit-image's bundled real photos (no ground truth: the table gives what the
engine kept and whether it warned) and the synthetic product shots of the test suite
(tests/images.py, which come with their true mask: the table gives the IoU). Columns:
the share of the image's border its backdrop model fits and the colour spread there
(the two figures its warning is decided on, deployments/classic.py), the share of the
image it kept as foreground, the IoU where a truth exists, and whether
``X-Engine-Warning`` would be sent. docs/PERFORMANCE.md quotes the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployments import classic  # noqa: E402
from tests.images import product_photo  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")


def border_fit(rgb: np.ndarray) -> tuple[float, float]:
    """(share of the border the backdrop model fits, its colour spread in Lab units),
    at the size the engine segments."""
    work = classic._fit_within(classic._fit_within(rgb, classic.ClassicCutoutEngine.info.max_side),
                               classic._CUTOUT_SEGMENT_SIDE)
    fit = classic._fit_border_backdrop(cv2.cvtColor(work.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab))
    return fit.border_share, fit.noise


def row(name: str, rgb: np.ndarray, truth: np.ndarray | None) -> str:
    ((mask, warning),) = classic.ClassicCutoutEngine().predict_with_warnings([rgb])
    share, spread = border_fit(rgb)
    kept = mask >= 128
    iou = f"{(kept & truth).sum() / (kept | truth).sum():.3f}" if truth is not None else "n/a"
    return (f"| {name} | {rgb.shape[1]}x{rgb.shape[0]} | {share:.0%} | {spread:.1f} | {kept.mean():.0%} | "
            f"{iou} | {'yes' if warning else 'no'} |")


def main() -> int:
    from skimage import data

    print("| image | size | border fitted | colour spread (Lab) | kept as foreground | IoU vs truth | warns |")
    print("|---|---|---|---|---|---|---|")
    for name in PHOTOS:
        rgb = getattr(data, name)()
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        print(row(f"skimage `{name}()`", np.ascontiguousarray(rgb[..., :3]), None))
    for background in ("plain", "gradient"):
        rgb, truth = product_photo(1024, 768, background=background, seed=1)
        print(row(f"product shot, {background} backdrop (tests/images.py)", rgb, truth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
