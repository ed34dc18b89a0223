#!/usr/bin/env python
"""Benchmarks for Strata.

    python scripts/bench.py [--quick] [--json PATH] [--bench NAME ...]

Each benchmark is one function in ``BENCHMARKS`` that returns a JSON-able dict
and prints its own table; ``--bench`` picks which run (default: all). Add HTTP
throughput, batching and so on as more entries.

``cpu-path`` measures what the ingress does on CPU around the model for one
photo: decode the JPEG -> resize to the model's 1024x1024 -> resize the model's
mask back to full size -> put it on as alpha -> encode the RGBA cutout as PNG.
It runs our code (``serve_app.imaging``, the functions the ingress calls) and
the Pillow-default path a hand-written FastAPI service would use, side by side:
interleaved repetitions, medians. The model is not part of this figure, so the
mask is a fixed synthetic one at model size.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import PIL
import simplejpeg
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_app import imaging  # noqa: E402

MODEL_SIZE = (1024, 1024)
STEPS = ("decode", "resize to model", "mask to full size", "compose", "encode PNG")

# --------------------------------------------------------------------------- test data


def synthetic_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like RGB image: smooth gradients, fine texture and sensor noise.

    Noise matters: it is what makes real photos expensive to compress, and a flat
    synthetic image would flatter every PNG encoder.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.dstack([
        128 + 100 * np.sin(x / 97) * np.cos(y / 131),
        128 + 90 * np.cos((x + y) / 173),
        128 + 80 * np.sin(np.hypot(x - width / 2, y - height / 2) / 60),
    ])
    texture = cv2.GaussianBlur(rng.normal(0, 25, (height, width, 3)).astype(np.float32), (0, 0), 1.2)
    noise = rng.normal(0, 4, (height, width, 3)).astype(np.float32)
    return np.clip(base + texture + noise, 0, 255).astype(np.uint8)


def synthetic_mask(width: int, height: int) -> np.ndarray:
    """A model-sized soft mask: an off-centre subject covering about 40 % of the frame."""
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width * 9 // 20, height * 11 // 20), (width * 3 // 10, height * 2 // 5), 0, 0, 360, 255, -1)
    cv2.circle(mask, (width * 3 // 4, height // 4), width // 8, 255, -1)
    return cv2.GaussianBlur(mask, (0, 0), 2.5)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- the two paths

Timings = dict[str, float]


def ours(data: bytes, mask: np.ndarray) -> tuple[Timings, bytes]:
    """What the ingress runs (``render_cutout`` is compose + encode_png for these options)."""
    t0 = time.perf_counter()
    image = imaging.decode_image(data)
    t1 = time.perf_counter()
    size = imaging.model_input_size(image.width, image.height, MODEL_SIZE, None)
    model_input = imaging.resize_image(image.rgb, size)
    t2 = time.perf_counter()
    full_mask = imaging.resize_mask(mask, (image.width, image.height))
    t3 = time.perf_counter()
    rgba = imaging.compose(image.rgb, full_mask)
    t4 = time.perf_counter()
    png = imaging.encode_png(rgba)
    t5 = time.perf_counter()
    assert model_input.shape == (MODEL_SIZE[1], MODEL_SIZE[0], 3)
    return _steps(t0, t1, t2, t3, t4, t5), png


def pillow_default(data: bytes, mask: np.ndarray) -> tuple[Timings, bytes]:
    """The plain Pillow path of a hand-written service, every call at its defaults."""
    t0 = time.perf_counter()
    im = Image.open(io.BytesIO(data)).convert("RGB")
    t1 = time.perf_counter()
    model_input = np.asarray(im.resize(MODEL_SIZE))
    t2 = time.perf_counter()
    full_mask = Image.fromarray(mask).resize(im.size)
    t3 = time.perf_counter()
    im.putalpha(full_mask)
    t4 = time.perf_counter()
    buf = io.BytesIO()
    im.save(buf, "PNG")
    t5 = time.perf_counter()
    assert model_input.shape == (MODEL_SIZE[1], MODEL_SIZE[0], 3)
    return _steps(t0, t1, t2, t3, t4, t5), buf.getvalue()


def _steps(*stamps: float) -> Timings:
    timings = {step: (b - a) * 1000 for step, a, b in zip(STEPS, stamps, stamps[1:])}
    timings["total"] = (stamps[-1] - stamps[0]) * 1000
    return timings


# --------------------------------------------------------------------------- benchmarks


def bench_cpu_path(quick: bool) -> dict:
    """Ours vs Pillow-default on the ingress's CPU path, per step and in total."""
    reps = 3 if quick else 11
    cases = [(1024, 1024), (2048, 1536)]
    results = []
    for width, height in cases:
        data = jpeg_bytes(synthetic_photo(width, height))
        mask = synthetic_mask(*MODEL_SIZE)
        _check_same_cutout(data, mask)  # also the warm-up of both paths
        runs: dict[str, list[Timings]] = {"ours": [], "pillow": []}
        outputs: dict[str, bytes] = {}
        paths: dict[str, Callable] = {"ours": ours, "pillow": pillow_default}
        image = imaging.decode_image(data)
        full_mask = imaging.resize_mask(mask, (width, height))
        # Our encoder on exactly the pixels Pillow writes (colour kept under alpha 0),
        # to show the encoder alone, apart from compose clearing transparent colour.
        same_pixels = np.dstack((image.rgb, full_mask))
        encode_same, refine = [], []
        for rep in range(reps):
            order = ("ours", "pillow") if rep % 2 == 0 else ("pillow", "ours")
            for name in order:
                gc.collect()
                timings, outputs[name] = paths[name](data, mask)
                runs[name].append(timings)
            encode_same.append(_timed(imaging.encode_png, same_pixels))
            refine.append(_timed(imaging.refine_foreground, image.rgb, full_mask))
        medians = {name: {key: statistics.median(r[key] for r in rs) for key in (*STEPS, "total")}
                   for name, rs in runs.items()}
        case = {
            "source": f"{width}x{height} JPEG q90",
            "source_bytes": len(data),
            "model_size": list(MODEL_SIZE),
            "repetitions": reps,
            "median_ms": medians,
            "ratio_pillow_over_ours": {key: medians["pillow"][key] / medians["ours"][key]
                                       for key in (*STEPS, "total")},
            "output_bytes": {name: len(out) for name, out in outputs.items()},
            "encode_png_same_pixels_as_pillow_ms": statistics.median(encode_same),
            "encode_png_same_pixels_bytes": len(imaging.encode_png(same_pixels)),
            "refine_foreground_ms": statistics.median(refine),
        }
        results.append(case)
        _print_case(case)
    return {"cases": results}


def _timed(fn: Callable, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1000


def _check_same_cutout(data: bytes, mask: np.ndarray) -> None:
    """Both paths must produce the same picture, and ours what the ingress sends."""
    _, ours_png = ours(data, mask)
    _, pillow_png = pillow_default(data, mask)
    image = imaging.decode_image(data)
    rendered = imaging.render_cutout(image, imaging.resize_mask(mask, (image.width, image.height)))
    assert rendered.data == ours_png, "bench's 'ours' differs from render_cutout"
    a = np.asarray(Image.open(io.BytesIO(ours_png))).astype(np.int16)
    b = np.asarray(Image.open(io.BytesIO(pillow_png))).astype(np.int16)
    assert a.shape == b.shape
    visible = (a[..., 3] > 0) & (b[..., 3] > 0)
    # Same alpha up to bilinear vs bicubic mask resizing; same colours up to JPEG decoders' rounding.
    assert np.abs(a[..., 3] - b[..., 3]).mean() < 1.0
    assert np.abs(a[..., :3][visible] - b[..., :3][visible]).mean() < 1.0


def _print_case(case: dict) -> None:
    ours_ms, pil_ms, ratio = (case["median_ms"]["ours"], case["median_ms"]["pillow"],
                              case["ratio_pillow_over_ours"])
    print(f"\nCPU path: {case['source']} ({case['source_bytes'] / 1e3:.0f} kB) -> model "
          f"{case['model_size'][0]}x{case['model_size'][1]} -> RGBA PNG; "
          f"median of {case['repetitions']} interleaved runs")
    print(f"  {'step':<20}{'ours ms':>10}{'Pillow-default ms':>20}{'ratio':>9}")
    for key in (*STEPS, "total"):
        if key == "total":
            print("  " + "-" * 57)
        print(f"  {key:<20}{ours_ms[key]:>10.1f}{pil_ms[key]:>20.1f}{ratio[key]:>8.1f}x")
    out = case["output_bytes"]
    print(f"  {'PNG size':<20}{out['ours'] / 1e6:>8.2f}MB{out['pillow'] / 1e6:>18.2f}MB")
    same = case["encode_png_same_pixels_as_pillow_ms"]
    print(f"  our encode_png on Pillow's exact pixels (transparent colour kept): {same:.1f} ms, "
          f"{case['encode_png_same_pixels_bytes'] / 1e6:.2f} MB ({pil_ms['encode PNG'] / same:.1f}x faster)")
    print(f"  refine_foreground (optional, ours): {case['refine_foreground_ms']:.1f} ms")


BENCHMARKS: dict[str, Callable[[bool], dict]] = {
    "cpu-path": bench_cpu_path,
}


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "pillow": PIL.__version__,
        "simplejpeg": simplejpeg.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (well under a minute)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--bench", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                        help=f"run only these (repeatable; default all: {', '.join(BENCHMARKS)})")
    args = parser.parse_args(argv)
    env = environment()
    print(f"Python {env['python']}, {env['cpus']} CPUs, load average {env['load_average']}, "
          f"OpenCV {env['opencv']}, Pillow {env['pillow']}, simplejpeg {env['simplejpeg']}")
    results = {name: BENCHMARKS[name](args.quick) for name in (args.bench or BENCHMARKS)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "quick": args.quick, "benchmarks": results},
                                        indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
