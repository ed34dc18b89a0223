"""Images wider than 65535 px (PNG's fast encoder stores each side in 16 bits) come
back whole, on both routes that encode PNGs: a cutout and a layer job's layers."""

from __future__ import annotations

import numpy as np

from tests.test_layer_jobs_api import submit
from tests.test_remove_background_api import open_image, png_bytes

WIDTH, HEIGHT = 100_000, 16


def wide_banner() -> np.ndarray:
    """A 100000x16 banner: a red band on light grey."""
    rgb = np.full((HEIGHT, WIDTH, 3), 235, np.uint8)
    rgb[4:12, 20_000:80_000] = (200, 30, 30)
    return rgb


def test_a_cutout_of_an_image_wider_than_65535_px_comes_back_at_its_size(client):
    response = client.post("/v1/remove-background", params={"model": "classic"},
                           files={"image": ("banner.png", png_bytes(wide_banner()), "image/png")})
    assert response.status_code == 200, response.text
    cutout = open_image(response.content)
    assert cutout.size == (WIDTH, HEIGHT) and cutout.mode == "RGBA"
    assert np.asarray(cutout).shape == (HEIGHT, WIDTH, 4)  # every row decodes: none cut short


def test_a_layer_job_on_an_image_wider_than_65535_px_succeeds_with_whole_layers(client):
    response = submit(client, png_bytes(wide_banner()), headers={"Prefer": "wait=60"}, model="classic", layers=2)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job
    layer = client.get(f"/v1/jobs/{job['id']}/layers/1.png")
    assert layer.status_code == 200
    assert open_image(layer.content).size == (WIDTH, HEIGHT)
