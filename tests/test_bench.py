"""The benchmark's seed-style baseline does the same job as Strata, so their figures compare.

scripts/baseline_app.py wraps the same engine in a plain FastAPI app; here it runs
in-process (FastAPI's TestClient, no server, no Ray) on the tiny BiRefNet.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_app import imaging
from tests.conftest import load_script

bench = load_script("bench")
baseline_app = load_script("baseline_app")
SIZE = 64  # the tiny model's input size here; the photo is larger, so both paths resize


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import transformers.dynamic_module_utils as dynamic_modules

    from deployments.birefnet import BiRefNetEngine

    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(dynamic_modules, "HF_MODULES_CACHE", str(home / "modules"))
        mp.setattr(sys, "path", list(sys.path))
        weights = load_script("make_tiny_models").make_tiny_birefnet(tmp_path_factory.mktemp("tiny"))
        engine = BiRefNetEngine(str(weights), device="cpu", input_size=SIZE)
        engine.load()
        yield engine


@pytest.fixture(scope="module")
def photo() -> bytes:
    rgb = bench.synthetic_photo(160, 120, seed=3)
    rgb[30:90, 40:110] = (220, 40, 40)  # a red block: foreground for the tiny model
    return bench.jpeg_bytes(rgb)


def _post(app, photo: bytes):
    with TestClient(app) as client:
        return client.post("/v1/remove-background", files={"image": ("photo.jpg", photo, "image/jpeg")})


def test_fast_baseline_answers_exactly_what_strata_renders_in_process(engine, photo):
    response = _post(baseline_app.build_app(engine, SIZE, "fast"), photo)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == bench.inprocess_pipeline(engine, photo, SIZE)()


def test_seed_style_baseline_answers_the_same_cutout_up_to_resampling(engine, photo):
    response = _post(baseline_app.build_app(engine, SIZE, "pillow"), photo)
    assert response.status_code == 200
    theirs = np.asarray(Image.open(io.BytesIO(response.content)))
    ours = imaging.decode_rgba_png(bench.inprocess_pipeline(engine, photo, SIZE)())
    assert theirs.shape == ours.shape == (120, 160, 4)
    # Pillow resizes bicubic, we bilinear/area: the alpha differs only along edges.
    assert np.abs(theirs[..., 3].astype(int) - ours[..., 3].astype(int)).mean() < 2.0
    assert (theirs[..., 3] > 128).sum() == pytest.approx((ours[..., 3] > 128).sum(), rel=0.02)
