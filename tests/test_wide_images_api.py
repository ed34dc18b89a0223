"""Images wider than 65535 px (PNG's fast encoder stores each side in 16 bits) come
back whole, on both routes that encode PNGs: a cutout and a layer job's layers; on
remove.bg's route, where a JPG cannot be that wide (65500 px), `format=auto` gives a
PNG and `format=jpg` a 400 that names the limit; a layer job's PSD, which holds at
most 30000 px a side, is a 422 that says so."""

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


def test_a_psd_of_layers_wider_than_30000_px_is_422_naming_the_limit_and_the_zip_holds_them(client):
    response = submit(client, png_bytes(wide_banner()), headers={"Prefer": "wait=60"}, model="classic", layers=2)
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    psd = client.get(f"/v1/jobs/{job_id}/result.psd")
    assert psd.status_code == 422, psd.text
    assert psd.headers["content-type"] == "application/problem+json"
    assert "30000" in psd.json()["detail"] and "result.zip" in psd.json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}/result.zip").status_code == 200


def test_remove_bg_format_auto_gives_a_png_where_a_jpg_could_not_hold_the_width(client):
    # An opaque result is a JPG under format=auto, but a JPG holds at most 65500 px a side.
    response = client.post("/v1.0/removebg", headers={"X-Api-Key": "any"},
                           files={"image_file": ("banner.png", png_bytes(wide_banner()), "image/png")},
                           data={"size": "full", "bg_color": "fff"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = open_image(response.content)
    assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"


def test_remove_bg_format_jpg_past_65500_px_is_400_naming_the_limit(client):
    response = client.post("/v1.0/removebg", headers={"X-Api-Key": "any"},
                           files={"image_file": ("banner.png", png_bytes(wide_banner()), "image/png")},
                           data={"size": "full", "format": "jpg"})
    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "resolution_too_high" and "65500" in error["detail"]
