#!/usr/bin/env python
"""One-shot GPU check: the real-size stand-ins on a GPU, through the real code, one JSON.

    python scripts/gpu_check.py                           # on a GPU box: ~6-8 minutes on one H100
    python scripts/gpu_check.py --device cpu --small      # the dry run `make test` runs (~2 min here)
    python scripts/gpu_check.py --skip serve --skip qwen  # sections: birefnet, engine, serve, qwen

Needs the project installed with its GPU extras (``pip install -e '.[gpu,test]'``:
torchvision for deform_conv2d, aiohttp for the load). No weights are downloaded: every
model is built here with random weights (their cost does not depend on the values).

Sections, in this order (each one's failure is recorded in the JSON and the run goes on;
the exit status is 1 if any failed):

``build``
    scripts/make_real_size_models.py writes the BiRefNet-class stand-in (Swin-L, 220M
    parameters; ``--small``: the lite one, Swin-T) into the work directory: the
    directory the engine and the Serve replica load, exactly as a hub snapshot.
``birefnet``
    That model, loaded by the engine's loader (``deployments.remote_code``), moved to
    the device and called directly on (B, 3, S, S) tensors: images per second at batch
    1/4/8/16 in float16 and bfloat16, eager, and float16 ``torch.compile``d as the
    engine compiles it (static, then one recompile with a dynamic batch; each row's
    first call is timed), with the peak GPU memory of each. bfloat16 is expected to
    fail where torchvision's deform_conv2d runs (it has no bfloat16 kernel; the engine
    refuses bfloat16 for BiRefNet for that reason): the failure is the finding,
    recorded as the row's ``error``. ``--small`` runs float32 and bfloat16 at batch 1/2
    and compiles bfloat16 at batch 1 with the ``eager`` backend (it traces, generates
    no code): the CPU has no fast float16 kernels, and tracing alone takes ~40 s here.
``engine``
    ``BiRefNetEngine`` on the same directory with ``dtype: auto`` (float16 on a GPU):
    images per second through ``predict`` (uint8 photos in, masks out: upload,
    normalisation, model, sigmoid, download) at batch 1 and 8 (``--small``: 1, 2).
``serve``
    ``python -m serve_app.run`` on a fresh local Ray with configs/bench.yaml rewritten to
    serve that directory as model ``birefnet`` on the device (one replica, whole GPU,
    ``max_batch_size`` 16), four ingress replicas; once /v1/health says it runs the
    birefnet engine, closed-loop ``POST /v1/remove-background`` of a 1024x1024 JPEG at
    concurrency 32 (``--small``: 4, 256x256) for 30 s (``--small``: 5 s): images per
    second end to end, latency percentiles, batch sizes.
``qwen``
    A QwenImageLayeredPipeline whose transformer is Qwen-Image-Layered's at real size
    (20.4B parameters, built on the device in bfloat16) with the real VAE, a text encoder
    of the real width but one layer (its cost is the prompt's, once per call, not the
    steps'), the tiny builder's tokenizer, through ``QwenLayeredEngine.decompose`` (the
    adapter's real call): seconds per denoising step at 640 px, 4 layers, true CFG (two
    transformer passes a step), and the peak GPU memory. ``--small``: the tiny
    pipeline's configs, 2 steps, 2 layers.

Where the real models differ from these stand-ins, see scripts/make_real_size_models.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
for path in (ROOT, SCRIPTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SECTIONS = ("birefnet", "engine", "serve", "qwen")
# What each section of the JSON holds (the dry run's test checks these keys).
RESULT_KEYS = ("schema", "command", "small", "device", "started_at", "elapsed_s", "environment", "build",
               *SECTIONS, "errors")


def _load(name: str):
    """A module of scripts/ (not a package), loaded once under its own name."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


class Plan:
    """Sizes of the run: the real one, or ``--small`` (the CPU dry run)."""

    def __init__(self, small: bool, device: str):
        self.small = small
        self.device = device
        self.variant = "birefnet_lite" if small else "birefnet"
        self.input_size = 64 if small else 1024
        self.batches = (1, 2) if small else (1, 4, 8, 16)
        self.engine_batches = (1, 2) if small else (1, 8)
        # The CPU has no fast float16 kernels (a lite forward at 64 px takes seconds): the
        # dry run runs float32 and bfloat16 through the same code.
        self.dtypes = ("float32", "bfloat16") if small else ("float16", "bfloat16")
        self.compile_backend = "eager" if small else "inductor"
        # Compiling takes minutes (tracing alone ~40 s here, with the eager backend): one
        # dtype, float16, the one BiRefNet runs in on a GPU; the dry run at one batch size.
        self.compile_dtypes = ("bfloat16",) if small else ("float16",)
        self.compile_batches = (1,) if small else self.batches
        self.reps = 2 if small else 10  # timed calls per row after warm-up
        self.photo_side = 256 if small else 1024
        self.serve_concurrency = 4 if small else 32
        self.serve_measure_s = 5.0 if small else 30.0
        self.serve_warmup_s = 2.0 if small else 5.0
        self.serve_ready_s = 240.0 if small else 420.0
        self.ingress_replicas = 1 if small else 4
        self.max_batch_size = 4 if small else 16
        self.qwen_layers = 2 if small else 4
        self.qwen_steps = 2 if small else 6
        self.qwen_resolution = 640


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}"


# --------------------------------------------------------------------------- sections


def environment(device: str) -> dict:
    """The software and the device the figures come from."""
    import diffusers
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "diffusers": diffusers.__version__,
           "cpus": os.cpu_count(), "gpu": None, "gpu_memory_gib": None}
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except Exception as e:  # noqa: BLE001 - missing, or built for another torch
        env["torchvision"] = f"unavailable ({_error(e)[:120]})"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = props.total_memory / 2 ** 30
    return env


def build(plan: Plan, work: Path) -> dict:
    """The stand-in's directory, as the engine and Serve load it."""
    real_size = _load("make_real_size_models")
    started = time.perf_counter()
    path = real_size.make_real_size_birefnet(work / "models", plan.variant)
    return {"variant": plan.variant, "dir": str(path), "seconds": time.perf_counter() - started,
            "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}


def bench_birefnet(plan: Plan, weights: Path) -> dict:
    """The model itself on the device: img/s per dtype, compile and batch; peak memory."""
    import torch

    from deployments.remote_code import load_remote_model

    base = load_remote_model(weights).eval().requires_grad_(False)
    module = sys.modules[type(base).__module__]
    result = {"variant": plan.variant, "input_size": plan.input_size, "parameters": sum(p.numel() for p in base.parameters()),
              "deform_conv": getattr(module, "DEFORM_CONV", None), "compile_backend": plan.compile_backend,
              "rows": [], "compile_s": {}}
    for dtype_name in plan.dtypes:
        dtype = getattr(torch, dtype_name)
        model = base.to(device=plan.device, dtype=dtype)
        for compiled in (False, True) if dtype_name in plan.compile_dtypes else (False,):
            runner = model
            if compiled:
                torch._dynamo.reset()
                # As the engine compiles (dynamic=None): static at the first batch size, then
                # one recompile with the batch dimension dynamic. (dynamic=True makes the
                # window padding's sizes symbolic too, and tracing then takes many minutes.)
                runner = torch.compile(model, backend=plan.compile_backend)
            for batch in plan.compile_batches if compiled else plan.batches:
                row = {"dtype": dtype_name, "compile": compiled, "batch": batch}
                result["rows"].append(row)
                x = torch.randn(batch, 3, plan.input_size, plan.input_size, device=plan.device, dtype=dtype)
                try:
                    _reset_peak(plan.device)
                    with torch.inference_mode():
                        started = time.perf_counter()
                        runner(x)  # warm-up: kernel selection; with compile, a (re)compile
                        _sync(plan.device)
                        row["first_call_s"] = time.perf_counter() - started
                        if compiled and batch == plan.compile_batches[0]:
                            result["compile_s"][dtype_name] = row["first_call_s"]
                        runner(x)
                        _sync(plan.device)
                        times = []
                        for _ in range(plan.reps):
                            t0 = time.perf_counter()
                            out = runner(x)
                            _sync(plan.device)
                            times.append(time.perf_counter() - t0)
                    if tuple(out[-1].shape) != (batch, 1, plan.input_size, plan.input_size):
                        raise RuntimeError(f"output shape {tuple(out[-1].shape)}")
                    seconds = statistics.median(times)
                    row.update(ms_per_batch=seconds * 1000, img_per_s=batch / seconds,
                               peak_gpu_mib=_peak_mib(plan.device))
                except Exception as e:  # noqa: BLE001 - a dtype the kernels lack is a finding
                    row["error"] = _error(e)
                    if "bfloat16" in row["error"].lower() or "BFloat16" in row["error"]:
                        break  # the same at every batch size
                    if "out of memory" in row["error"].lower():
                        _free(plan.device)
                        break  # larger batches would not fit either
        del runner
        _free(plan.device)
    return result


def bench_engine(plan: Plan, weights: Path) -> dict:
    """BiRefNetEngine (dtype auto) on the device: img/s through predict, uint8 in and out."""
    from deployments.birefnet import BiRefNetEngine

    bench = _load("bench")
    engine = BiRefNetEngine(str(weights), device=plan.device, input_size=plan.input_size, warmup=True)
    _reset_peak(plan.device)
    started = time.perf_counter()
    engine.load()
    result = {"dtype": engine.info.dtype, "device": engine.info.device, "load_and_warmup_s": time.perf_counter() - started,
              "rows": []}
    photo = bench.synthetic_photo(plan.input_size, plan.input_size)
    for batch in plan.engine_batches:
        images = [photo] * batch
        engine.predict(images)
        times = []
        for _ in range(plan.reps):
            t0 = time.perf_counter()
            masks = engine.predict(images)
            times.append(time.perf_counter() - t0)
        assert masks[0].shape == (plan.input_size, plan.input_size)
        seconds = statistics.median(times)
        result["rows"].append({"batch": batch, "ms_per_batch": seconds * 1000, "img_per_s": batch / seconds})
    result["peak_gpu_mib"] = _peak_mib(plan.device)
    del engine
    _free(plan.device)
    return result


def serve_config(plan: Plan, weights: Path, work: Path, port: int) -> Path:
    """configs/bench.yaml rewritten to serve ``weights`` as ``birefnet`` on the device."""
    config = yaml.safe_load((ROOT / "configs" / "bench.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    gpu = plan.device.startswith("cuda")
    app["args"]["default_model"] = "birefnet"
    app["args"]["segmentation"] = {"birefnet": {
        "engine": "birefnet", "weights": str(weights), "device": plan.device, "dtype": "auto",
        "input_size": plan.input_size, "warmup": True, "num_gpus": 1.0 if gpu else 0.0,
        "num_cpus": 1.0 if gpu else 0.1,  # no fallback: a model that cannot load fails the check
    }}
    app["args"]["jobs"]["data_dir"] = str(work / "strata-data")
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    ingress["num_replicas"] = plan.ingress_replicas
    layers = [d for d in app["deployments"] if d["name"].startswith("layers-")]
    app["deployments"] = [ingress, {
        "name": "birefnet", "num_replicas": 1, "max_ongoing_requests": 4 * plan.max_batch_size,
        "max_queued_requests": 256,
        "user_config": {"max_batch_size": plan.max_batch_size, "batch_wait_timeout_s": 0.01},
    }, *layers]
    path = work / "gpu-check-serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def bench_serve(plan: Plan, weights: Path, work: Path) -> dict:
    """Serve end to end: closed loop at the plan's concurrency through the real app."""
    bench = _load("bench")
    port = bench.free_port()
    path = serve_config(plan, weights, work, port)
    memory = {**{name: None for name in bench.CPU_MODEL_MEMORY_ENV}, **bench.MEMORY_ENV}
    env = {"RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **memory,
           **bench.spare_serve_ports()}
    service = bench.Service("strata", [sys.executable, "-m", "serve_app.run", str(path)], port, "/v1/health",
                            work / "logs", env)
    health: dict[str, Any] = {}

    def running_birefnet(body: dict | None) -> bool:
        model = ((body or {}).get("models") or {}).get("birefnet") or {}
        health.update(model)
        return bool(body) and body.get("status") == "ok" and model.get("engine") == "birefnet"

    started = time.perf_counter()
    service.start()
    try:
        service.wait_ready(plan.serve_ready_s, running_birefnet)
        ready_s = time.perf_counter() - started
        photo = bench.jpeg_bytes(bench.synthetic_photo(plan.photo_side, plan.photo_side))
        url = f"{service.url}/v1/remove-background?model=birefnet"
        summary = asyncio.run(bench.closed_loop(url, photo, plan.serve_concurrency, plan.serve_warmup_s,
                                                plan.serve_measure_s))
    finally:
        service.stop()
    return {"concurrency": plan.serve_concurrency, "photo_side": plan.photo_side, "ready_s": ready_s,
            "ingress_replicas": plan.ingress_replicas, "max_batch_size": plan.max_batch_size,
            "img_per_s": summary["throughput_rps"], "health": health,
            **{k: summary[k] for k in ("requests", "errors", "statuses", "p50_ms", "p95_ms", "p99_ms",
                                       "mean_batch_size", "batch_sizes")}}


def build_layered_pipeline(plan: Plan):
    """A QwenImageLayeredPipeline built on the device in bfloat16 (see the module docstring)."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny = _load("make_tiny_models")
    real = _load("make_real_size_models").qwen_layered_configs()
    source = tiny.QWEN_LAYERED_CONFIG if plan.small else real
    text_config = dict(tiny.QWEN_LAYERED_CONFIG["text_config"])
    vision_config = dict(tiny.QWEN_LAYERED_CONFIG["vision_config"])
    if not plan.small:
        # The real width (the MMDiT's joint_attention_dim) with one layer: the prompt is
        # encoded once per call, the steps do not run it.
        real_text = real["text_encoder"]["text_config"]
        text_config = {k: real_text[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                 "rope_parameters", "max_position_embeddings", "rms_norm_eps")}
        text_config.update(num_hidden_layers=1, intermediate_size=4096)
        vision_config["out_hidden_size"] = real_text["hidden_size"]
    tokenizer = tiny._tiny_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tiny.QWEN_SPECIAL_TOKENS}
    te_config = Qwen2_5_VLConfig(
        text_config=dict(text_config, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=vision_config, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    default = torch.get_default_dtype()
    # Built where it runs, in the dtype it runs in: 20B parameters in float32 (80 GB) would
    # not fit the card, and initialising them on the CPU would take minutes.
    with torch.random.fork_rng(devices=[]), torch.device(plan.device):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        try:
            transformer = QwenImageTransformer2DModel(**source["transformer"]).eval()
            vae = AutoencoderKLQwenImage(**source["vae"]).eval()
            text_encoder = Qwen2_5_VLForConditionalGeneration(te_config).eval()
        finally:
            torch.set_default_dtype(default)
    pipe = QwenImageLayeredPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**real["scheduler"]), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, processor=None,
                                    transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_qwen(plan: Plan) -> dict:
    """Seconds per denoising step through the engine's decompose, at 640 px."""
    import torch

    from deployments.engine import EngineInfo, LayerParams
    from deployments.qwen_layered import QwenLayeredEngine

    _reset_peak(plan.device)
    started = time.perf_counter()
    pipe = build_layered_pipeline(plan)
    build_s = time.perf_counter() - started
    engine = QwenLayeredEngine("real-size stand-in (in memory)", device=plan.device, dtype="bfloat16")
    # The engine's own decompose on a pipeline built in memory: writing 40 GB of random
    # weights to disk for load() to read back would take most of the check's time.
    engine._pipe, engine._device = pipe, plan.device
    engine.info = EngineInfo(engine=engine.name, device=plan.device, dtype="bfloat16")
    stamps: list[float] = []
    image = np.full((480, 640, 4), (120, 140, 160, 255), np.uint8)
    image[100:300, 200:450] = (220, 40, 40, 255)
    params = LayerParams(layers=plan.qwen_layers, resolution=plan.qwen_resolution, steps=plan.qwen_steps, seed=0,
                         prompt="a red rectangle on a grey-blue background")
    started = time.perf_counter()
    layers = engine.decompose(image, params, on_step=lambda step, total: stamps.append(time.perf_counter()))
    total_s = time.perf_counter() - started
    steps = np.diff([started, *stamps]).tolist()
    result = {
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "dtype": str(next(pipe.transformer.parameters()).dtype).removeprefix("torch."),
        "resolution": plan.qwen_resolution, "layers": plan.qwen_layers, "steps": plan.qwen_steps, "cfg": True,
        "build_s": build_s, "total_s": total_s, "step_s": steps,
        # The first step also encodes the prompt and the image: the rest are the steady cost.
        "seconds_per_step": statistics.median(steps[1:]) if len(steps) > 1 else steps[0],
        "layers_returned": len(layers), "peak_gpu_mib": _peak_mib(plan.device),
    }
    del engine, pipe
    _free(plan.device)
    torch._dynamo.reset()
    return result


# --------------------------------------------------------------------------- main


def run(plan: Plan, out: Path, skip: set[str], work: Path) -> dict:
    """Every section in order, each failure recorded; the JSON rewritten after each."""
    result: dict[str, Any] = {key: None for key in RESULT_KEYS}
    result.update(schema=1, command=" ".join(sys.argv), small=plan.small, device=plan.device,
                  started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), errors=[])
    started = time.perf_counter()

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    def section(name: str, fn: Callable[[], dict]) -> None:
        if name in skip:
            result[name] = {"skipped": True}
            return
        print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", flush=True)
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
            result[name] = {"error": _error(e)}
            result["errors"].append(f"{name}: {_error(e)}")
            traceback.print_exc()
        save()

    section("environment", lambda: environment(plan.device))
    section("build", lambda: build(plan, work))
    weights = Path(result["build"]["dir"]) if "dir" in (result["build"] or {}) else None
    for name, fn in (("birefnet", lambda: bench_birefnet(plan, weights)),
                     ("engine", lambda: bench_engine(plan, weights)),
                     ("serve", lambda: bench_serve(plan, weights, work))):
        section(name, fn if weights else _no_weights)
    section("qwen", lambda: bench_qwen(plan))
    save()
    print(f"[{result['elapsed_s']:6.0f} s] wrote {out}" + (f"; {len(result['errors'])} section(s) failed"
                                                         if result["errors"] else ""), flush=True)
    return result


def _no_weights() -> dict:
    raise RuntimeError("the build section failed: no model directory")


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every section ran."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the dry run)")
    parser.add_argument("--small", action="store_true", help="small models and short runs: the CPU dry run")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON (default: bench-results/gpu-check-<UTC time>.json)")
    parser.add_argument("--skip", action="append", choices=SECTIONS, default=[], help="leave a section out (repeatable)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where models and logs go (default: a temporary directory, removed after)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("torch sees no CUDA GPU here: use --device cpu --small for the dry run")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / "bench-results" / f"gpu-check-{stamp}.json"
    with contextlib.ExitStack() as stack:
        if args.work is None:
            work = Path(tempfile.mkdtemp(prefix="strata-gpu-check-"))
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        else:
            work = args.work
            work.mkdir(parents=True, exist_ok=True)
        result = run(Plan(args.small, args.device), out, set(args.skip), work)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
