#!/usr/bin/env python
"""Benchmarks for Strata, side by side with what users would otherwise run.

    python scripts/bench.py --quick          # under 3 minutes on a 2-core machine
    python scripts/bench.py                  # the full run (longer runs, 1024x1024 photos)
    python scripts/bench.py --bench cpu-path --bench engine   # a subset

Prints a table per benchmark and writes everything as JSON to
``bench-results/bench-<quick|full>-<UTC time>.json`` (``--json PATH`` to choose).
docs/PERFORMANCE.md explains every figure; in short:

``cpu-path``
    What the ingress does on CPU around the model for one photo (decode, resize to
    the model, mask back to full size, compose, PNG encode): ``serve_app.imaging``
    vs the Pillow-default path of a hand-written service, interleaved, medians.
``engine``
    The tiny BiRefNet (scripts/make_tiny_models.py) called in-process with batches
    of 1..16 at the HTTP benchmarks' model size, on one thread as in a Serve replica:
    per call and per image, so you see whether batching can pay on this CPU.
``serving``
    Starts, on free loopback ports, Strata (``python -m serve_app.run`` on a fresh
    local Ray with configs/bench.yaml) and two single-process FastAPI + uvicorn apps
    of scripts/baseline_app.py around the same engine: ``baseline`` (seed-style:
    Pillow decode, engine under a lock, Pillow PNG encode) and ``baseline-fast``
    (the same app with Strata's own CPU path). Then, all up at once, each first
    warmed by a burst at concurrency 32 (Strata: on each model it serves), and
    measured one after the other per setting:

    * HTTP: ``POST /v1/remove-background`` of one photo, closed-loop at
      concurrency 1, 8, 32 (each client sends its next request when the last one
      answered) and open-loop (Poisson arrivals at a fixed rate; latency counted
      from the scheduled arrival, so a slow server cannot slow the clock):
      throughput, p50/p95/p99 latency, errors. Strata is asked for what the
      baseline makes (``refine_foreground=false``).
    * serving overhead: Strata's p50 at concurrency 1 minus the median of the
      same work done in-process (decode, resize, engine, mask back, compose,
      encode: the ingress's calls, one thread for the engine as in a replica).
    * batching: ``X-Batch-Size`` distribution and throughput at concurrency 32
      for the same model with ``max_batch_size`` 8 (and 16 in the full run) vs 1.
    * layer jobs (classic engine): submit-to-done time (POST /v1/layers until
      the job's terminal ``status`` event arrives on its SSE stream) minus the
      engine's own in-process time for the same image; and SSE event latency:
      receipt time of each ``progress`` event minus its ``at`` (when the model
      finished that step, stamped in the model replica).

``engine-options`` (run only when named; made for a GPU box)
    The BiRefNet engine's speed options (bfloat16, channels_last, torch.compile) each
    against float32: time per call at batch 1 and 8, and how far the masks move.
    ``--weights`` and ``--device`` pick the model and device (default: the tiny one, CPU).

``real-size`` (run only when named; ~25 minutes here)
    The real-size BiRefNet-class (Swin-L) and BiRefNet_lite-class (Swin-T) stand-ins of
    scripts/make_real_size_models.py (random weights, the real architectures) through the
    engine on this CPU: ms per image at batch 1 and at the best batch, peak RSS, float32
    and bfloat16 autocast (where the CPU has bfloat16 instructions), on all cores and on
    the one thread a Serve CPU replica runs on, the full one at 768 and 512 too, lite with
    channels_last and torch.compile. Each case runs in a fresh process.

Figures taken while other work runs on the machine are noisy; run it on a quiet
machine (the docs say how the published table was taken). Ratios are measured
side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import PIL
import simplejpeg
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_app import imaging  # noqa: E402
from serve_app.run import CPU_MODEL_MEMORY_ENV, MEMORY_ENV, SERVING_ENV, free_port, spare_serve_ports  # noqa: E402
from serve_app.transport import BY_REFERENCE_ABOVE_BYTES  # noqa: E402

MODEL_SIZE = (1024, 1024)
STEPS = ("decode", "resize to model", "mask to full size", "compose", "encode PNG")

# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """How long and how big each benchmark runs (``QUICK`` or ``FULL``)."""

    name: str
    cpu_cases: tuple[tuple[int, int], ...]  # photo sizes of the CPU-path benchmark
    cpu_reps: int
    photo_side: int  # the HTTP benchmarks' square photo
    model_side: int  # the tiny BiRefNet's input size (the real BiRefNet's: 1024)
    warmup_s: float  # closed loop: requests before this are not measured
    first_burst_s: float  # each server's first burst at the top concurrency, before anything is measured
    measure_s: float  # closed loop: the measured window
    open_s: float  # open loop: arrivals are scheduled over this long
    drain_s: float  # longest wait for the last answers after a run
    concurrencies: tuple[int, ...]
    batch_sizes: tuple[int, ...]  # max_batch_size values compared with 1 (off)
    engine_batches: tuple[int, ...]
    overhead_rounds: int
    layer_jobs: int
    layer_side: int


QUICK = Settings("quick", cpu_cases=((1024, 1024),), cpu_reps=3, photo_side=512, model_side=1024,
                 warmup_s=1.0, first_burst_s=3.0, measure_s=4.0, open_s=4.0, drain_s=8.0, concurrencies=(1, 8, 32),
                 batch_sizes=(8,), engine_batches=(1, 2, 4, 8), overhead_rounds=60, layer_jobs=3, layer_side=512)
FULL = Settings("full", cpu_cases=((1024, 1024), (2048, 1536)), cpu_reps=11, photo_side=1024, model_side=1024,
                warmup_s=3.0, first_burst_s=6.0, measure_s=20.0, open_s=20.0, drain_s=30.0, concurrencies=(1, 8, 32),
                batch_sizes=(8, 16), engine_batches=(1, 2, 4, 8, 16), overhead_rounds=100, layer_jobs=10,
                layer_side=1024)

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


def bench_cpu_path(settings: Settings) -> dict:
    """Ours vs Pillow-default on the ingress's CPU path, per step and in total."""
    reps = settings.cpu_reps
    cases = settings.cpu_cases
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


# --------------------------------------------------------------------------- engine


def tiny_birefnet_dir() -> Path:
    """The tiny BiRefNet of scripts/make_tiny_models.py under models/tiny (built if missing)."""
    spec = importlib.util.spec_from_file_location("make_tiny_models", ROOT / "scripts" / "make_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_birefnet(ROOT / "models" / "tiny")


def load_tiny_engine(input_size: int):
    """The tiny BiRefNet engine on CPU, on one thread as in a Serve replica (Ray sets
    OMP_NUM_THREADS=1 for actors with fractional CPUs)."""
    import torch

    from deployments.birefnet import BiRefNetEngine

    torch.set_num_threads(1)
    engine = BiRefNetEngine(str(tiny_birefnet_dir()), device="cpu", input_size=input_size)
    engine.load()
    return engine


def bench_engine(settings: Settings) -> dict:
    """Cost of one engine call by batch size, in-process: can batching pay on this CPU?"""
    side = settings.model_side
    engine = load_tiny_engine(side)
    image = synthetic_photo(side, side)
    rows = []
    for batch in settings.engine_batches:
        images = [image] * batch
        engine.predict(images)  # warm-up
        reps = max(3, 16 // batch)
        times = []
        for _ in range(reps):
            times.append(_timed(engine.predict, images))
        call = statistics.median(times)
        rows.append({"batch": batch, "ms_per_call": call, "ms_per_image": call / batch})
    single = rows[0]["ms_per_image"]
    for row in rows:
        row["per_image_vs_batch_1"] = row["ms_per_image"] / single
    print(f"\nEngine: tiny BiRefNet at {side}x{side}, in-process, 1 thread; median per call")
    print(f"  {'batch':>5}{'ms/call':>10}{'ms/image':>10}{'per image vs batch 1':>22}")
    for row in rows:
        print(f"  {row['batch']:>5}{row['ms_per_call']:>10.1f}{row['ms_per_image']:>10.2f}"
              f"{row['per_image_vs_batch_1']:>21.2f}x")
    return {"model": "tiny BiRefNet (scripts/make_tiny_models.py)", "input_size": side, "threads": 1,
            "rows": rows}


# Speed options of the BiRefNet engine compared by ``engine-options`` (the GPU paths).
OPTION_SETS: dict[str, dict] = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "bfloat16 + channels_last": {"dtype": "bfloat16", "channels_last": True},
    "bfloat16 + channels_last + compile": {"dtype": "bfloat16", "channels_last": True, "compile": True},
}


def bench_engine_options(settings: Settings, weights: str | None = None, device: str = "cpu") -> dict:
    """The BiRefNet engine's speed options, each against float32: time per call at batch 1
    and 8 (after the engine's own warm-up) and how far its masks are from float32's.

    Made for a GPU box (``--weights ZhengPeng7/BiRefNet --device cuda``); without
    ``--weights`` it runs the tiny model here, which only shows that every option runs."""
    from deployments.birefnet import BiRefNetEngine

    side = settings.model_side
    weights = weights or str(tiny_birefnet_dir())
    photos = [synthetic_photo(side, side, seed=i) for i in range(8)]
    rows, reference = [], None
    for name, options in OPTION_SETS.items():
        engine = BiRefNetEngine(weights, device=device, input_size=side, warmup=True, **options)
        started = time.perf_counter()
        engine.load()
        load_s = time.perf_counter() - started
        masks = engine.predict(photos)
        reference = reference or masks
        diff = [np.abs(m.astype(np.int16) - r.astype(np.int16)) for m, r in zip(masks, reference)]
        row = {"options": name, "dtype": engine.info.dtype, "load_and_warmup_s": load_s,
               "mask_max_diff": int(max(d.max() for d in diff)),
               "mask_mean_diff": float(np.mean([d.mean() for d in diff]))}
        for batch in (1, 8):
            row[f"batch_{batch}_ms"] = statistics.median(_timed(engine.predict, photos[:batch]) for _ in range(3))
        rows.append(row)
        del engine
    print(f"\nEngine options: BiRefNet engine on {device}, {weights}, {side}x{side}; median of 3 calls")
    print(f"  {'options':<36}{'batch 1 ms':>11}{'batch 8 ms':>11}{'load+warm-up s':>16}{'mask diff max/mean':>20}")
    for row in rows:
        print(f"  {row['options']:<36}{row['batch_1_ms']:>11.1f}{row['batch_8_ms']:>11.1f}{row['load_and_warmup_s']:>16.1f}"
              f"{row['mask_max_diff']:>13}/{row['mask_mean_diff']:.2f}")
    return {"weights": weights, "device": device, "input_size": side, "rows": rows}


# --------------------------------------------------------------------------- real-size

REAL_SIZE_DIR = ROOT / "models" / "real-size"


@dataclass(frozen=True)
class RealSizeCase:
    """One configuration of a real-size stand-in, measured in a process of its own (so its
    peak RSS is its own): the engine's options, the CPU threads, the batches timed."""

    variant: str  # a directory of scripts/make_real_size_models.py: birefnet or birefnet_lite
    input_size: int = 1024
    dtype: str = "float32"  # the engine's setting; "autocast" is bfloat16 autocast on the CPU
    threads: int = 2
    batches: tuple[int, ...] = (1,)
    reps: int = 1  # timed calls per batch (median), after one untimed warm-up call at the first batch
    channels_last: bool = False
    compile: bool = False

    @property
    def label(self) -> str:
        options = [name for name, on in (("channels_last", self.channels_last), ("compile", self.compile)) if on]
        return " + ".join([self.dtype, *options])


def real_size_cases(bf16: bool) -> list[RealSizeCase]:
    """What ``--bench real-size`` measures (about 25 minutes on this 2-core machine): both
    classes at 1024 in float32 and, where the CPU has bfloat16 instructions, bfloat16
    autocast, on all cores and on the one thread a Serve CPU replica gets; the full one
    at smaller input sizes; lite with the GPU options that also run on a CPU."""
    precisions = ["float32", *(["autocast"] if bf16 else [])]
    cases = []
    for dtype in precisions:
        cases.append(RealSizeCase("birefnet_lite", dtype=dtype, batches=(1, 2, 4), reps=2))
        cases.append(RealSizeCase("birefnet_lite", dtype=dtype, threads=1))
        cases.append(RealSizeCase("birefnet", dtype=dtype, batches=(1, 2)))
        cases.append(RealSizeCase("birefnet", dtype=dtype, threads=1))
    for size in (768, 512):
        cases.append(RealSizeCase("birefnet", input_size=size, reps=2))
        cases.append(RealSizeCase("birefnet", input_size=size, threads=1))
    cases.append(RealSizeCase("birefnet_lite", channels_last=True, reps=2))
    cases.append(RealSizeCase("birefnet", channels_last=True))
    cases.append(RealSizeCase("birefnet_lite", compile=True, reps=2))  # its first call compiles: ~5 min here
    return cases


def run_real_size_case(case: dict, weights_dir: str) -> dict:
    """Measure one RealSizeCase (as a dict) in this process: the engine loaded as a
    replica loads it, then per batch the median ms per call and this process's peak RSS."""
    import resource

    import torch

    from deployments.birefnet import BiRefNetEngine

    c = RealSizeCase(**{**case, "batches": tuple(case["batches"])})
    torch.set_num_threads(c.threads)
    engine = BiRefNetEngine(str(Path(weights_dir) / c.variant), device="cpu", dtype=c.dtype, input_size=c.input_size,
                            channels_last=c.channels_last, compile=c.compile)
    started = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - started
    image = synthetic_photo(c.input_size, c.input_size)
    first_call_ms = _timed(engine.predict, [image] * c.batches[0])  # warm-up (the compile, if any)
    rows = []
    for batch in c.batches:
        call = statistics.median(_timed(engine.predict, [image] * batch) for _ in range(c.reps))
        rows.append({"batch": batch, "ms_per_call": call, "ms_per_image": call / batch,
                     "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    best = min(rows, key=lambda row: row["ms_per_image"])
    return {**case, "label": c.label, "engine_dtype": engine.info.dtype, "load_s": load_s,
            "first_call_ms": first_call_ms, "rows": rows, "best_batch": best["batch"],
            "peak_rss_mib": max(row["peak_rss_mib"] for row in rows)}


_CASE_RUNNER = """\
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
sys.modules["bench"] = bench
spec.loader.exec_module(bench)
print("REAL-SIZE-RESULT " + json.dumps(bench.run_real_size_case(json.loads(sys.argv[2]), sys.argv[3])))
"""


def _real_size_in_subprocess(case: RealSizeCase, weights_dir: Path) -> dict:
    from dataclasses import asdict

    done = subprocess.run([sys.executable, "-c", _CASE_RUNNER, str(Path(__file__).resolve()), json.dumps(asdict(case)),
                           str(weights_dir)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in done.stdout.splitlines():
        if line.startswith("REAL-SIZE-RESULT "):
            return json.loads(line.split(" ", 1)[1])
    tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    return {**asdict(case), "label": case.label, "error": f"exit {done.returncode}: {tail[-400:]}"}


def cpu_runs_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions oneDNN uses (AVX512-BF16 or AMX)."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def bench_real_size(settings: Settings, cases: list[RealSizeCase] | None = None,
                    weights_dir: Path | None = None) -> dict:
    """The real-size BiRefNet- and lite-class stand-ins (scripts/make_real_size_models.py,
    built into models/real-size if missing) on this CPU: ms per image at batch 1 and the
    best batch, peak RSS, per precision and option, each case in a fresh process."""
    weights_dir = weights_dir or REAL_SIZE_DIR
    bf16 = cpu_runs_bfloat16()
    cases = cases if cases is not None else real_size_cases(bf16)
    spec = importlib.util.spec_from_file_location("make_real_size_models", ROOT / "scripts" / "make_real_size_models.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    for variant in sorted({case.variant for case in cases}):
        builder.make_real_size_birefnet(weights_dir, variant)
    results = []
    print(f"\nReal-size stand-ins on CPU (random weights, scripts/make_real_size_models.py); bfloat16 "
          f"{'runs' if bf16 else 'not run: no AVX512-BF16/AMX'}; each case a fresh process")
    print(f"  {'model':<14}{'size':>5} {'precision/options':<29}{'thr':>4}{'batch 1 ms/img':>15}"
          f"{'best batch':>11}{'ms/img':>9}{'peak RSS MiB':>13}{'load s':>7}{'1st call s':>11}")
    for case in cases:
        result = _real_size_in_subprocess(case, weights_dir)
        results.append(result)
        if "error" in result:
            print(f"  {case.variant:<14}{case.input_size:>5} {case.label:<29}{case.threads:>4}  failed: {result['error']}")
            continue
        one = next(row for row in result["rows"] if row["batch"] == 1)
        best = next(row for row in result["rows"] if row["batch"] == result["best_batch"])
        print(f"  {case.variant:<14}{case.input_size:>5} {case.label:<29}{case.threads:>4}{one['ms_per_image']:>15.0f}"
              f"{best['batch']:>11}{best['ms_per_image']:>9.0f}{result['peak_rss_mib']:>13.0f}{result['load_s']:>7.1f}"
              f"{result['first_call_ms'] / 1000:>11.1f}")
    return {"weights_dir": str(weights_dir), "cpu_bfloat16": bf16, "cases": results}


# --------------------------------------------------------------------------- servers


class Service:
    """An HTTP server the bench started as a subprocess on a loopback port."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, log_dir: Path,
                 env: dict[str, str | None] | None = None):
        self.name = name
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        merged = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                  "HF_HUB_OFFLINE": "1", **(env or {})}
        self.env = {key: value for key, value in merged.items() if value is not None}  # None: unset
        self._process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        # Own session: stop() can end the server and everything it started.
        self._process = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float, ready: Callable[[dict | None], bool] = lambda body: True) -> None:
        """Poll ``ready_path`` until it answers 200 and ``ready(json)`` holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5) as response:
                    body = json.loads(response.read() or b"null")
                    if response.status == 200 and ready(body):
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)  # polling a condition with a deadline
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM (Strata's runner turns it into serve's clean Ctrl-C), then SIGKILL the group."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._log.close()


def strata_service(settings: Settings, weights: Path, work: Path) -> Service:
    """Strata from configs/bench.yaml on a fresh local Ray, on a free port."""
    config = yaml.safe_load((ROOT / "configs" / "bench.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    args = app["args"]
    for model in args["segmentation"].values():
        model["weights"] = str(weights)
        model["input_size"] = settings.model_side
    args["jobs"]["data_dir"] = str(work / "strata-data")
    if 16 in settings.batch_sizes:
        args["segmentation"]["tiny-b16"] = dict(args["segmentation"]["tiny"])
        tiny = next(d for d in app["deployments"] if d["name"] == "tiny")
        app["deployments"].append({**tiny, "name": "tiny-b16", "max_ongoing_requests": 16,
                                   "user_config": {**tiny["user_config"], "max_batch_size": 16}})
    path = work / "strata-bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # Strata's Ray under the memory settings of every process (MEMORY_ENV), not this
    # process's CPU-model ones: its CPU model replicas get those from their runtime_env.
    memory = {**{name: None for name in CPU_MODEL_MEMORY_ENV}, **MEMORY_ENV}
    env = {"RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           **memory, **spare_serve_ports()}
    return Service("strata", [sys.executable, "-m", "serve_app.run", str(path)], port, "/v1/health",
                   work / "logs", env)


def batching_models(settings: Settings) -> dict[int, str]:
    """max_batch_size -> the model name serving the tiny BiRefNet with it (configs/bench.yaml)."""
    return {1: "tiny-unbatched", 8: "tiny", **({16: "tiny-b16"} if 16 in settings.batch_sizes else {})}


def strata_url(strata: Service, model: str) -> str:
    """Strata's background removal with ``model``, doing the work the baselines do (no foreground refinement)."""
    return f"{strata.url}/v1/remove-background?model={model}&refine_foreground=false"


def baseline_service(name: str, codec: str, settings: Settings, weights: Path, work: Path) -> Service:
    port = free_port()
    argv = [sys.executable, str(ROOT / "scripts" / "baseline_app.py"), "--port", str(port),
            "--weights", str(weights), "--input-size", str(settings.model_side), "--codec", codec]
    return Service(name, argv, port, "/healthz", work / "logs")


def _strata_healthy(body: dict | None) -> bool:
    return bool(body) and body.get("status") == "ok"


# --------------------------------------------------------------------------- load


@dataclass
class Sample:
    """One request: when it was due, sent and answered (perf_counter seconds), and what came back."""

    due: float
    sent: float
    done: float
    status: int
    batch_size: int | None = None
    processing_ms: float | None = None
    server_timing: dict[str, float] | None = None  # Strata's Server-Timing header: step -> ms


def _server_timing(header: str | None) -> dict[str, float] | None:
    """`decode;dur=1.4, model;dur=33.0` -> {"decode": 1.4, "model": 33.0}."""
    if not header:
        return None
    steps = (entry.strip().split(";dur=") for entry in header.split(","))
    return {name: float(ms) for name, ms in steps}


async def _post(session, url: str, photo: bytes, due: float) -> Sample:
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("image", photo, filename="photo.jpg", content_type="image/jpeg")
    sent = time.perf_counter()
    try:
        async with session.post(url, data=form) as response:
            await response.read()
            status = response.status
            batch = response.headers.get("X-Batch-Size")
            processing = response.headers.get("X-Processing-Ms")
            timing = response.headers.get("Server-Timing")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return Sample(due, sent, time.perf_counter(), 0)
    return Sample(due, sent, time.perf_counter(), status, int(batch) if batch else None,
                  float(processing) if processing else None, _server_timing(timing))


def _session(limit: int):
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=300))


async def closed_loop(url: str, photo: bytes, concurrency: int, warmup_s: float, measure_s: float) -> dict:
    """``concurrency`` clients, each sending its next request when its last one answered."""
    samples: list[Sample] = []
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + measure_s)

    async def client(session) -> None:
        while time.perf_counter() < window[1]:
            now = time.perf_counter()
            samples.append(await _post(session, url, photo, now))

    async with _session(concurrency) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return _summary(samples, window, {"mode": "closed", "concurrency": concurrency})


async def open_loop(url: str, photo: bytes, rate: float, duration_s: float, drain_s: float, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` per second for ``duration_s``; latency from each arrival's due time."""
    rng = np.random.default_rng(seed)
    dues, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= duration_s:
            break
        dues.append(t)
    samples: list[Sample] = []
    async with _session(0) as session:
        start = time.perf_counter()
        tasks = []
        for offset in dues:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival schedule itself, not a wait for a condition
            tasks.append(asyncio.ensure_future(_post(session, url, photo, start + offset)))
        done, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        samples = [task.result() for task in done]
    window = (start, start + duration_s)
    summary = _summary(samples, window, {"mode": "open", "rate_rps": rate, "scheduled": len(dues)})
    summary["unfinished"] = len(pending)
    summary["errors"] += len(pending)
    # Answers per second from the first arrival to the last answer: the arrival rate when
    # the server keeps up, its capacity when it does not.
    answered = [s for s in samples if s.status == 200]
    summary["throughput_rps"] = len(answered) / (max(s.done for s in answered) - start) if answered else 0.0
    return summary


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot, from /proc/stat (Linux)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(timeout_s: float, window_s: float = 0.3, max_busy_cores: float = 0.3) -> float:
    """Wait until the machine's CPUs are quiet; returns the seconds waited.

    A server still working through requests whose callers gave up (an open loop's
    unfinished arrivals: nothing cancels them on the server) would slow whatever is
    measured next."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        before = _busy_cpu_seconds()
        if before is None:
            return 0.0  # not Linux: nothing to read
        time.sleep(window_s)  # the window the CPU use is measured over
        after = _busy_cpu_seconds()
        if (after - before) / window_s <= max_busy_cores:
            return time.perf_counter() - started
    print(f"  (the machine was still busy after {timeout_s:.0f} s; measuring anyway)")
    return time.perf_counter() - started


def _summary(samples: list[Sample], window: tuple[float, float], head: dict) -> dict:
    """Throughput over the window; latencies of the requests due in it (answered at any time)."""
    measured = [s for s in samples if window[0] <= s.due < window[1]]
    ok = [s for s in measured if s.status == 200]
    completed_in_window = [s for s in samples if s.status == 200 and window[0] <= s.done < window[1]]
    latencies = np.array([(s.done - s.due) * 1000 for s in ok]) if ok else np.array([np.nan])
    batches = Counter(s.batch_size for s in ok if s.batch_size is not None)
    processing = [s.processing_ms for s in ok if s.processing_ms is not None]
    return {
        **head,
        "requests": len(measured),
        "errors": len(measured) - len(ok),
        "statuses": dict(Counter(s.status for s in measured)),
        "throughput_rps": len(completed_in_window) / (window[1] - window[0]),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "mean_ms": float(latencies.mean()),
        "batch_sizes": {str(k): v for k, v in sorted(batches.items())},
        "mean_batch_size": (sum(k * v for k, v in batches.items()) / sum(batches.values())) if batches else None,
        "server_processing_p50_ms": statistics.median(processing) if processing else None,
    }


# --------------------------------------------------------------------------- in-process reference


def inprocess_pipeline(engine, photo: bytes, size: int) -> Callable[[], bytes]:
    """The ingress's work for one request, in this process (what serving overhead is measured against)."""

    def run() -> bytes:
        image = imaging.decode_image(photo)
        model_input = imaging.resize_image(image.rgb, imaging.model_input_size(image.width, image.height,
                                                                               (size, size), None))
        (mask,) = engine.predict([model_input])
        full_mask = imaging.resize_mask(mask, (image.width, image.height))
        return imaging.render_cutout(image, full_mask, refine_foreground=False).data

    return run


# --------------------------------------------------------------------------- layer jobs


def flat_graphic(side: int) -> np.ndarray:
    """A poster-like RGBA image (flat colours, anti-aliased edges, text): what the classic engine is for."""
    rgb = np.full((side, side, 3), (240, 236, 228), np.uint8)
    cv2.rectangle(rgb, (side // 8, side // 8), (side * 5 // 8, side * 5 // 8), (30, 80, 200), -1, cv2.LINE_AA)
    cv2.circle(rgb, (side * 5 // 8, side * 5 // 8), side // 4, (220, 50, 40), -1, cv2.LINE_AA)
    cv2.putText(rgb, "STRATA", (side // 10, side * 9 // 10), cv2.FONT_HERSHEY_SIMPLEX, side / 300,
                (20, 20, 20), max(1, side // 100), cv2.LINE_AA)
    return np.dstack([rgb, np.full((side, side), 255, np.uint8)])


LAYERS = 4


def layer_engine_ms(rgba: np.ndarray, reps: int) -> float:
    """The classic layer engine's own time for ``rgba``, in-process (median)."""
    from deployments.classic import ClassicLayerEngine
    from deployments.engine import LayerParams

    engine = ClassicLayerEngine()
    params = LayerParams(layers=LAYERS)
    engine.decompose(rgba, params)
    return statistics.median(_timed(engine.decompose, rgba, params) for _ in range(reps))


def run_layer_job(base_url: str, png: bytes) -> dict:
    """Submit one job, follow its SSE stream to the end; times in this process's clock."""
    import httpx
    from httpx_sse import connect_sse

    with httpx.Client(base_url=base_url, timeout=120) as client:
        submitted = time.time()
        response = client.post("/v1/layers", params={"model": "classic", "layers": LAYERS},
                               files={"image": ("poster.png", png, "image/png")})
        response.raise_for_status()
        job_id = response.json()["id"]
        latencies, status, done = [], None, None
        with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
            for event in source.iter_sse():
                received = time.time()
                data = event.json()
                if event.event == "progress" and data.get("at"):
                    latencies.append((received - datetime.fromisoformat(data["at"]).timestamp()) * 1000)
                elif event.event == "status" and data["status"] in ("succeeded", "failed", "cancelled"):
                    status, done = data["status"], received
                    break
        manifest = client.get(f"/v1/jobs/{job_id}/manifest.json").json() if status == "succeeded" else {}
    return {"status": status, "submit_to_done_ms": ((done or time.time()) - submitted) * 1000,
            "sse_latency_ms": latencies, "timings": manifest.get("timings", {})}


def bench_layer_jobs(settings: Settings, strata: Service) -> dict:
    rgba = flat_graphic(settings.layer_side)
    png = imaging.encode_png(rgba)
    engine_ms = layer_engine_ms(rgba, max(3, settings.layer_jobs))
    jobs = [run_layer_job(strata.url, png) for _ in range(settings.layer_jobs)]
    ok = [j for j in jobs if j["status"] == "succeeded"]
    total = statistics.median(j["submit_to_done_ms"] for j in ok) if ok else float("nan")
    sse = [x for j in ok for x in j["sse_latency_ms"]]
    result = {
        "image": f"{settings.layer_side}x{settings.layer_side} flat graphic PNG, classic engine, {LAYERS} layers",
        "jobs": len(jobs),
        "succeeded": len(ok),
        "engine_ms_inprocess": engine_ms,
        "submit_to_done_p50_ms": total,
        "overhead_p50_ms": total - engine_ms,
        "manifest_queue_ms_p50": statistics.median(j["timings"].get("queue_ms", float("nan")) for j in ok)
        if ok else None,
        "manifest_model_ms_p50": statistics.median(j["timings"].get("model_ms", float("nan")) for j in ok)
        if ok else None,
        "sse_events": len(sse),
        "sse_latency_p50_ms": float(np.percentile(sse, 50)) if sse else None,
        "sse_latency_max_ms": max(sse) if sse else None,
    }
    print(f"\nLayer jobs: {result['image']}; {result['succeeded']}/{result['jobs']} jobs, medians")
    print(f"  engine in-process {engine_ms:8.1f} ms")
    print(f"  submit to done    {total:8.1f} ms  (queue {result['manifest_queue_ms_p50'] or 0:.1f} ms, "
          f"model call {result['manifest_model_ms_p50'] or 0:.1f} ms as the manifest records)")
    print(f"  overhead          {result['overhead_p50_ms']:8.1f} ms  (submit to done minus engine)")
    if sse:
        print(f"  SSE event latency p50 {result['sse_latency_p50_ms']:.1f} ms, max {result['sse_latency_max_ms']:.1f} ms "
              f"over {len(sse)} progress events (receipt minus the step's end in the model replica)")
    return result


# --------------------------------------------------------------------------- the serving benchmark


def bench_serving(settings: Settings) -> dict:
    """Strata on Ray Serve vs the baselines over HTTP, serving overhead, batching, layer jobs."""
    weights = tiny_birefnet_dir()
    side = settings.photo_side
    photo = jpeg_bytes(synthetic_photo(side, side, seed=1))
    work = Path(tempfile.mkdtemp(prefix="strata-bench-"))
    strata = strata_service(settings, weights, work)
    baselines = [baseline_service("baseline", "pillow", settings, weights, work),
                 baseline_service("baseline-fast", "fast", settings, weights, work)]
    services = [strata, *baselines]
    t0 = time.perf_counter()
    try:
        for service in services:
            service.start()
        for service in baselines:
            service.wait_ready(120)
        strata.wait_ready(300, _strata_healthy)
        startup_s = time.perf_counter() - t0
        # What `python -m serve_app.run` gave Strata's Ray: its defaults unless this environment overrides them.
        serve_env = {name: strata.env.get(name, value) for name, value in SERVING_ENV.items()}
        fast = serve_env["RAY_SERVE_ENABLE_HA_PROXY"] == serve_env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        print(f"\nServing: {side}x{side} JPEG photo ({len(photo) / 1e3:.0f} kB) -> RGBA PNG cutout; tiny BiRefNet at "
              f"{settings.model_side}x{settings.model_side}; servers up in {startup_s:.0f} s; Strata's request path: "
              + ("HAProxy, direct ingress, gRPC" if fast else "Serve's default proxy (the fast path turned off in this environment)"))
        urls = {
            "strata": strata_url(strata, "tiny"),
            "baseline": f"{baselines[0].url}/v1/remove-background",
            "baseline-fast": f"{baselines[1].url}/v1/remove-background",
        }
        return _measure_serving(settings, photo, urls, strata) | {"startup_s": startup_s, "strata_serve_env": serve_env}
    finally:
        for service in services:
            service.stop()
        shutil.rmtree(work / "strata-data", ignore_errors=True)


def _measure_serving(settings: Settings, photo: bytes, urls: dict[str, str], strata: Service) -> dict:
    run = asyncio.run
    # A burst at the top concurrency on every path before anything is measured: first
    # requests load lazy state, and the first burst grows each process's memory, which on
    # the bench's VM took seconds (its first touch of a page costs ~30 us: docs/PERFORMANCE.md).
    strata_models = [strata_url(strata, model) for model in batching_models(settings).values()]  # "tiny" among them
    for url in [*(url for name, url in urls.items() if name != "strata"), *strata_models]:
        run(closed_loop(url, photo, max(settings.concurrencies), 0.0, settings.first_burst_s))

    http = []
    for concurrency in settings.concurrencies:
        for system, url in urls.items():
            http.append({"system": system, **run(closed_loop(url, photo, concurrency, settings.warmup_s,
                                                              settings.measure_s))})
    capacity = {s: max(r["throughput_rps"] for r in http if r["system"] == s) for s in urls}
    # Open loop at two rates: half of what the seed-style baseline sustains (everyone keeps up:
    # compare latencies), and 70 % of what Strata sustains (past the baseline's capacity).
    rates = sorted({round(0.5 * capacity["baseline"], 1), round(0.7 * capacity["strata"], 1)})
    for rate in rates:
        if rate <= 0:
            continue
        for system in ("strata", "baseline"):
            http.append({"system": system, **run(open_loop(urls[system], photo, rate, settings.open_s,
                                                           settings.drain_s))})
            http[-1]["quiet_after_s"] = wait_until_quiet(timeout_s=300)
    _print_http(http)

    floors = {name: run(_empty_route_p50(url.split("/v1/")[0] + "/healthz"))
              for name, url in urls.items() if name != "baseline-fast"}
    overhead = _serving_overhead(settings, photo, urls, floors)
    batching = _batching(settings, photo, strata)
    layers = bench_layer_jobs(settings, strata)
    return {"http": http, "capacity_rps": capacity, "overhead": overhead, "batching": batching,
            "layer_jobs": layers, "photo_bytes": len(photo), "photo": f"{settings.photo_side}x{settings.photo_side}"
            " JPEG q90", "model": f"tiny BiRefNet at {settings.model_side}x{settings.model_side}"}


async def _empty_route_p50(url: str, count: int = 60) -> float:
    """p50 of a route that does no work: the serving stack's own round trip."""
    async with _session(1) as session:
        times = []
        for _ in range(count):
            sent = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
            times.append((time.perf_counter() - sent) * 1000)
    return statistics.median(times[5:])


async def _interleaved(work: Callable[[], bytes], urls: dict[str, str], photo: bytes, reps: int) -> dict:
    """One request at a time, in turn: in-process, then each server; ``reps`` rounds.

    Taken in turn so that all of them see the same machine (other load drifts)."""
    times: dict[str, list[float]] = {"in-process": [], **{name: [] for name in urls}}
    processing: list[float] = []
    steps: dict[str, list[float]] = {}
    beyond_work: list[float] = []  # each Strata request's latency minus its work, as Strata timed it
    async with _session(1) as session:
        for _ in range(reps):
            times["in-process"].append(_timed(work))
            for name, url in urls.items():
                sample = await _post(session, url, photo, time.perf_counter())
                if sample.status != 200:
                    raise RuntimeError(f"{name} answered {sample.status} during the overhead measurement")
                times[name].append((sample.done - sample.due) * 1000)
                if name == "strata":
                    processing.append(sample.processing_ms)
                    for step, ms in sample.server_timing.items():
                        steps.setdefault(step, []).append(ms)
                    own_work = sum(sample.server_timing[step] for step in ("decode", "engine", "render"))
                    beyond_work.append(times[name][-1] - own_work)
    # Each round's Strata latency minus its in-process time, taken a few ms apart: what
    # slows the machine for a while (other tenants of a VM) slows both and cancels out.
    paired = [strata - inprocess for strata, inprocess in zip(times["strata"], times["in-process"])]
    return {"p50_ms": {name: statistics.median(t) for name, t in times.items()},
            "strata_overhead_paired_p50_ms": statistics.median(paired),
            "strata_processing_p50_ms": statistics.median(processing),
            "strata_steps_p50_ms": {step: statistics.median(t) for step, t in steps.items()},
            "strata_beyond_own_work_p50_ms": statistics.median(beyond_work)}


def _serving_overhead(settings: Settings, photo: bytes, urls: dict[str, str], floors: dict[str, float]) -> dict:
    engine = load_tiny_engine(settings.model_side)
    work = inprocess_pipeline(engine, photo, settings.model_side)
    work()
    engine_only_input = imaging.resize_image(imaging.decode_image(photo).rgb, (settings.model_side,) * 2)
    engine_ms = statistics.median(_timed(engine.predict, [engine_only_input]) for _ in range(5))
    turns = asyncio.run(_interleaved(work, {k: urls[k] for k in ("strata", "baseline-fast")}, photo,
                                     settings.overhead_rounds))
    p50 = turns["p50_ms"]
    inprocess, processing = p50["in-process"], turns["strata_processing_p50_ms"]
    result = {
        "method": f"{settings.overhead_rounds} rounds, one request at a time, in turn: in-process, Strata, "
                  "baseline-fast",
        "inprocess_ms": inprocess,
        "engine_ms": engine_ms,
        "strata_p50_ms": p50["strata"],
        "strata_overhead_p50_ms": p50["strata"] - inprocess,
        "strata_overhead_paired_p50_ms": turns["strata_overhead_paired_p50_ms"],
        # X-Processing-Ms is the ingress's own time (handler start to response): what lies
        # outside it is the HTTP hop (HAProxy, the replica's HTTP server); what lies inside
        # beyond the work, the model call through Ray, batching's wait and the thread-pool hops.
        "strata_server_processing_p50_ms": processing,
        "strata_http_hop_ms": p50["strata"] - processing,
        "strata_inside_ingress_overhead_ms": processing - inprocess,
        # Server-Timing splits the ingress's time: decode, the model call (the engine's own
        # time within it) and render; the rest is routing, reading the body and thread hops.
        "strata_steps_p50_ms": turns["strata_steps_p50_ms"],
        # The same overhead measured against the work where Strata did it (decode, engine,
        # render per Server-Timing), not against the bench's own process: an engine can
        # run at different speeds in different processes, which the in-process
        # difference counts as overhead.
        "strata_beyond_own_work_p50_ms": turns["strata_beyond_own_work_p50_ms"],
        "baseline_fast_p50_ms": p50["baseline-fast"],
        "baseline_fast_overhead_p50_ms": p50["baseline-fast"] - inprocess,
        "healthz_p50_ms": floors,
    }
    print(f"\nServing overhead at concurrency 1: p50 over HTTP minus the same work in-process "
          f"({inprocess:.1f} ms, of which the engine {engine_ms:.1f} ms); {result['method']}")
    print(f"  Strata (Ray Serve)        p50 {p50['strata']:7.1f} ms   overhead {result['strata_overhead_p50_ms']:6.1f} ms"
          f"   = HTTP hop {result['strata_http_hop_ms']:.1f} + inside the ingress "
          f"{result['strata_inside_ingress_overhead_ms']:.1f} (model call via Ray, thread hops)")
    steps = turns["strata_steps_p50_ms"]
    rest = processing - steps["decode"] - steps["model"] - steps["render"]
    print(f"    its parts (p50 of each, Server-Timing): decode {steps['decode']:.1f}, model call {steps['model']:.1f} "
          f"(engine {steps['engine']:.1f} + {steps['model'] - steps['engine']:.1f} to the replica and back), "
          f"render {steps['render']:.1f}, rest of the ingress {rest:.1f}, HTTP hop {result['strata_http_hop_ms']:.1f}")
    print(f"    the same overhead round by round (median of each round's Strata minus in-process): "
          f"{result['strata_overhead_paired_p50_ms']:.1f} ms")
    print(f"    latency beyond the work as Strata's own processes timed it (decode, engine, render), p50: "
          f"{result['strata_beyond_own_work_p50_ms']:.1f} ms")
    print(f"  baseline-fast (uvicorn)   p50 {p50['baseline-fast']:7.1f} ms   overhead "
          f"{result['baseline_fast_overhead_p50_ms']:6.1f} ms")
    print("  GET /healthz (no work, the stack's own round trip) p50: "
          + ", ".join(f"{name} {ms:.1f} ms" for name, ms in floors.items()))
    return result


def _batching(settings: Settings, photo: bytes, strata: Service) -> dict:
    concurrency = max(settings.concurrencies)
    rows = []
    # Measured back to back here (not reusing the runs above), so on and off see the same machine.
    for max_batch, model in batching_models(settings).items():
        summary = asyncio.run(closed_loop(strata_url(strata, model), photo, concurrency, settings.warmup_s, settings.measure_s))
        rows.append({"max_batch_size": max_batch, "model": model, **summary})
    print(f"\nBatching at concurrency {concurrency} (closed loop, the same tiny model; "
          "max_batch_size 1 = batching off)")
    print(f"  {'max_batch_size':>14}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'mean batch':>12}  batch sizes (size: count)")
    for row in rows:
        sizes = ", ".join(f"{k}: {v}" for k, v in row["batch_sizes"].items())
        print(f"  {row['max_batch_size']:>14}{row['throughput_rps']:>8.1f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}"
              f"{row['mean_batch_size'] or 0:>12.2f}  {sizes}")
    return {"concurrency": concurrency, "rows": rows}


def _print_http(http: list[dict]) -> None:
    print(f"\n  {'system':<15}{'load':<12}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'mean batch':>12}")
    for r in http:
        load = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['rate_rps']:g}/s open"
        batch = f"{r['mean_batch_size']:.2f}" if r["mean_batch_size"] else "-"
        print(f"  {r['system']:<15}{load:<12}{r['throughput_rps']:>8.1f}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}"
              f"{r['p99_ms']:>9.1f}{r['errors']:>8}{batch:>12}")
    waits = [r for r in http if r.get("quiet_after_s", 0) >= 1]
    if waits:
        print("  after its open loop the machine was busy for (the server finishing requests its callers gave up): "
              + ", ".join(f"{r['system']} at {r['rate_rps']:g}/s {r['quiet_after_s']:.0f} s" for r in waits))

# --------------------------------------------------------------------------- transport (on request)


def _serving_env() -> None:
    """Strata's serving environment for the Ray this process starts (what it has not set already)."""
    for name, value in {**SERVING_ENV, **spare_serve_ports(), "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(name, value)


def _on_own_ray(app, name: str, ask: Callable):
    """Run Serve application `app` on a fresh local Ray in this process, await
    `ask(handle)` on it, and stop both; returns the answer."""
    import ray
    from ray import serve

    async def measure(handle):
        answer = await ask(handle)
        await serve.shutdown_async()
        return answer

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        return asyncio.run(measure(serve.run(app, name=name, route_prefix=None)))
    finally:
        ray.shutdown()


TRANSPORT_SIZES = (58_000, 262_000, 786_000, 3_000_000, 6_000_000, 12_000_000, 48_000_000)


def bench_transport(settings: Settings) -> dict:
    """One call from a deployment to another by payload size, over gRPC and through Ray's
    object store, on a Ray of its own in this process under Serve's fast request path:
    the measurements behind serve_app.transport's threshold."""
    _serving_env()
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Receiver:
        async def take(self, payload: bytes) -> int:
            return len(payload)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Sender:
        def __init__(self, receiver) -> None:
            self.receiver = receiver

        async def timings(self, reps: int) -> dict[str, dict[str, float]]:
            result: dict[str, dict[str, float]] = {}
            for size in TRANSPORT_SIZES:
                payload = bytes(size)
                for by_reference in (False, True):
                    handle = self.receiver.options(_by_reference=by_reference)
                    times = []
                    for _ in range(reps):
                        sent = time.perf_counter()
                        await handle.take.remote(payload)
                        times.append((time.perf_counter() - sent) * 1000)
                    route = "object store" if by_reference else "gRPC"
                    result.setdefault(str(size), {})[route] = statistics.median(times[3:])
            return result

    timings = _on_own_ray(Sender.bind(Receiver.bind()), "transport",
                          lambda handle: handle.timings.remote(30 if settings.name == "quick" else 100))
    print("\nA call between deployments by payload size (median ms; serve_app.transport sends by reference "
          f"above {BY_REFERENCE_ABOVE_BYTES / 1e6:.2f} MB)")
    print(f"  {'payload':>10}{'gRPC':>9}{'object store':>14}")
    for size, routes in timings.items():
        print(f"  {int(size) / 1e3:>7.0f} kB{routes['gRPC']:>9.1f}{routes['object store']:>14.1f}")
    return {"median_ms_by_payload_bytes": timings, "by_reference_above_bytes": BY_REFERENCE_ABOVE_BYTES}


# --------------------------------------------------------------------------- model call (on request)


def bench_model_call(settings: Settings) -> dict:
    """Strata's segmentation deployment alone, on a Ray of its own in this process, called
    from another deployment (as the ingress calls it) with the quick run's model input,
    in alternation with the same engine call in the caller's process: the engine's speed
    in a replica against in-process, and what the call through Serve costs beyond it,
    with no HTTP and no ingress."""
    _serving_env()
    from ray import serve

    from deployments.segmentation import SegmentationDeployment, SegmentationModelConfig

    side, rounds = settings.model_side, settings.overhead_rounds
    photo = imaging.decode_image(jpeg_bytes(synthetic_photo(settings.photo_side, settings.photo_side)))
    model_input = imaging.resize_image(photo.rgb, imaging.model_input_size(photo.width, photo.height,
                                                                            (side, side), None))
    # Both replicas as serve_app.app deploys a CPU model: its memory settings from its runtime_env.
    cpu_model = {"runtime_env": {"env_vars": dict(CPU_MODEL_MEMORY_ENV)}}

    # The calls start in a deployment, as the ingress's do, on a handle made there: Serve
    # reads its fast-path settings (gRPC between deployments) when a process first imports
    # it, which this one did before they were set, and a handle keeps the settings of
    # the process that made it.
    @serve.deployment(ray_actor_options={"num_cpus": 0, **cpu_model})
    class Caller:
        def __init__(self, model) -> None:
            self.model = serve.get_deployment_handle(model.deployment_name, model.app_name)
            self.engine = load_tiny_engine(side)

        async def timings(self) -> dict[str, list[float]]:
            times: dict[str, list[float]] = {"in-process": [], "replica engine": [], "call": []}
            for _ in range(5):  # warm both sides
                await self.model.segment.remote(model_input)
                self.engine.predict([model_input])
            for _ in range(rounds):
                times["in-process"].append(_timed(self.engine.predict, [model_input]))
                sent = time.perf_counter()
                result = await self.model.segment.remote(model_input)
                times["call"].append((time.perf_counter() - sent) * 1000)
                times["replica engine"].append(result.engine_ms)
            return times

    config = SegmentationModelConfig(engine="birefnet", weights=str(tiny_birefnet_dir()), device="cpu",
                                     input_size=side)
    model = SegmentationDeployment.options(
        ray_actor_options={"num_cpus": 0.25, **cpu_model},
        user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
    ).bind("tiny", config)

    times = _on_own_ray(Caller.bind(model), "model-call", lambda handle: handle.timings.remote())
    beyond = [call - inside for call, inside in zip(times["call"], times["replica engine"])]
    result = {"rounds": rounds, "model_input_shape": list(model_input.shape),
              "p50_ms": {name: statistics.median(t) for name, t in times.items()},
              "call_beyond_engine_p50_ms": statistics.median(beyond)}
    p50 = result["p50_ms"]
    print(f"\nThe model call alone (Strata's segmentation deployment called from another deployment, a "
          f"{model_input.nbytes / 1e3:.0f} kB model input; {rounds} rounds in alternation with in-process), p50 ms:")
    print(f"  engine in-process {p50['in-process']:.1f}, engine in the replica {p50['replica engine']:.1f}, "
          f"the call {p50['call']:.1f}: {result['call_beyond_engine_p50_ms']:.1f} beyond the replica's engine")
    return result


BENCHMARKS: dict[str, Callable[[Settings], dict]] = {
    "cpu-path": bench_cpu_path,
    "engine": bench_engine,
    "serving": bench_serving,
}
# Run only when named: engine-options is made for a GPU box (``--bench engine-options --weights ... --device cuda``);
# transport and model-call take apart the cost of a call between deployments; real-size takes ~25 min.
ON_REQUEST = ("engine-options", "transport", "model-call", "real-size")


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "pillow": PIL.__version__,
        "simplejpeg": simplejpeg.__version__,
        "fpng": importlib.metadata.version("fpng"),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "memory_env": dict(MEMORY_ENV),  # Strata's Ray processes
        # Strata's CPU model replicas, and this process and the baselines, which run the engine too.
        "cpu_model_memory_env": {name: os.environ.get(name) for name in {**MEMORY_ENV, **CPU_MODEL_MEMORY_ENV}},
        "transparent_hugepage": _sysfs("/sys/kernel/mm/transparent_hugepage/enabled"),
    }


def _sysfs(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, 512x512 photos (under 3 minutes)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="where to write the results (default: bench-results/bench-<mode>-<time>.json)")
    parser.add_argument("--bench", action="append", choices=sorted([*BENCHMARKS, *ON_REQUEST]), metavar="NAME",
                        help=f"run only these (repeatable; default: {', '.join(BENCHMARKS)}; "
                             f"on request: {', '.join(ON_REQUEST)})")
    parser.add_argument("--weights", help="engine-options: a BiRefNet-family model id or directory (default: tiny)")
    parser.add_argument("--device", default="cpu", help="engine-options: cpu, cuda, cuda:N (default: cpu)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    env = environment()
    started = time.perf_counter()
    print(f"Strata bench ({settings.name}): Python {env['python']}, {env['cpus']} CPUs ({env['cpu_model']}), "
          f"load average {[round(x, 2) for x in env['load_average'] or []]}, torch {env['torch']}, "
          f"GPU {env['gpu'] or 'none'}, OpenCV {env['opencv']}, Pillow {env['pillow']}, "
          f"simplejpeg {env['simplejpeg']}, fpng {env['fpng']}")
    runners = {**BENCHMARKS,
               "engine-options": lambda s: bench_engine_options(s, weights=args.weights, device=args.device),
               "transport": bench_transport, "model-call": bench_model_call, "real-size": bench_real_size}
    results = {name: runners[name](settings) for name in (args.bench or BENCHMARKS)}
    elapsed = time.perf_counter() - started
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or ROOT / "bench-results" / f"bench-{settings.name}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    path.write_text(json.dumps({"environment": env, "mode": settings.name, "command": " ".join(sys.argv),
                                "elapsed_s": elapsed, "benchmarks": results}, indent=2) + "\n")
    print(f"\n{settings.name} run took {elapsed:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    # The in-process references and the baselines run the engine under the memory settings
    # Strata's CPU model replicas run it under (glibc reads them when a process starts,
    # hence the restart): what is compared is serving, not allocators.
    engine_env = {**MEMORY_ENV, **CPU_MODEL_MEMORY_ENV}
    if any(os.environ.get(name) != value for name, value in engine_env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **engine_env})
    raise SystemExit(main())
