#!/usr/bin/env python
"""The seed-style baseline that ``scripts/bench.py`` measures Strata against.

    python scripts/baseline_app.py --port 8001 --weights models/tiny/birefnet --input-size 512

A hand-written background-removal service as people write it first: one uvicorn
process, one FastAPI route, the same engine Strata serves called in-process. Every
step uses the library defaults: Pillow decodes the upload, Pillow resizes it to the
model's size, the engine runs under a lock (one request at a time through the model:
it is not thread-safe to share, and nobody batches by hand; one torch thread, as in a
Strata replica), Pillow resizes the mask
back, puts it on as alpha and writes the PNG at its default settings. The route is a
plain ``def``, so FastAPI runs it in its thread pool and Pillow's codecs, which
release the GIL, use both cores.

``--codec fast`` swaps the Pillow steps for Strata's own ``serve_app.imaging`` calls
(simplejpeg decode, one OpenCV resize, fast PNG settings): the same CPU path as
Strata without Ray Serve, which separates what the codecs win from what the serving
layer costs. Not part of Strata; used by the benchmark only.
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, File, Response, UploadFile
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_app(engine, input_size: int, codec: str) -> FastAPI:
    """The baseline's FastAPI app around a loaded segmentation engine."""
    from serve_app import imaging

    app = FastAPI(title="seed-style baseline")
    model_lock = threading.Lock()
    size = (input_size, input_size)

    def segment(model_input: np.ndarray) -> np.ndarray:
        with model_lock:
            return engine.predict([model_input])[0]

    def pillow_cutout(data: bytes) -> bytes:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        mask = segment(np.asarray(im.resize(size)))
        im.putalpha(Image.fromarray(mask).resize(im.size))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    def fast_cutout(data: bytes) -> bytes:
        image = imaging.decode_image(data)
        mask = segment(imaging.resize_image(image.rgb, size))
        return imaging.render_cutout(image, imaging.resize_mask(mask, (image.width, image.height))).data

    cutout = pillow_cutout if codec == "pillow" else fast_cutout

    @app.post("/v1/remove-background")
    def remove_background(image: UploadFile = File(...)) -> Response:
        return Response(cutout(image.file.read()), media_type="image/png", headers={"X-Batch-Size": "1"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--weights", required=True, help="BiRefNet-family model directory (or hub id)")
    parser.add_argument("--input-size", type=int, default=1024)
    parser.add_argument("--codec", choices=("pillow", "fast"), default="pillow")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: as in a Strata replica, where Ray sets OMP_NUM_THREADS=1)")
    args = parser.parse_args(argv)

    import torch

    from deployments.birefnet import BiRefNetEngine

    torch.set_num_threads(args.threads)

    engine = BiRefNetEngine(args.weights, device="cpu", input_size=args.input_size)
    engine.load()
    app = build_app(engine, args.input_size, args.codec)
    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
