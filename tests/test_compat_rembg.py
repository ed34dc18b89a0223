"""rembg's server API (`rembg s`) answered by Strata, over real HTTP on a real local Ray.

Requests are made as rembg's README and its clients make them: `POST /api/remove`
with a multipart `file` (`curl -F file=@input.jpg`), parameters as form fields or
in the query string. configs/test.yaml maps `birefnet-general` to the tiny
BiRefNet, which calls saturated red pixels foreground.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.image_server import ImageServer
from tests.test_remove_background_api import iou, jpeg_bytes, open_image, red_disc_png

IMAGE, DISC = red_disc_png(320, 240)


@pytest.fixture(scope="module")
def images():
    """A local web server with the red disc at /image.png (configs/test.yaml lets
    the ingress fetch from 127.0.0.1; production configs refuse private addresses)."""
    with ImageServer(IMAGE) as server:
        yield server


def remove(client, data: bytes, *, form=None, params=None, filename="input.png"):
    return client.post("/api/remove", files={"file": (filename, data)}, data=form or {}, params=params or {})


def assert_detail(response, status: int, *words: str):
    """An error in rembg's (FastAPI's) shape: {"detail": "..."}, not problem+json."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for word in words:
        assert word.lower() in detail.lower(), detail


def test_a_posted_file_comes_back_as_an_rgba_png_cutout_of_its_size(client):
    data, disc = red_disc_png(320, 240)
    response = remove(client, data, form={"model": "birefnet-general"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = open_image(response.content)
    assert image.mode == "RGBA" and image.size == (320, 240)
    assert iou(np.asarray(image)[..., 3] >= 128, disc) >= 0.9


def test_parameters_in_the_query_string_of_a_post_are_honoured(client):
    data, disc = red_disc_png()
    response = remove(client, data, params={"model": "birefnet-general", "om": "true"})
    assert response.status_code == 200, response.text
    assert response.headers["x-model"] == "tiny"
    assert open_image(response.content).mode == "L"


def test_a_jpeg_upload_gives_a_png(client):
    data, disc = red_disc_png()
    rgb = np.asarray(open_image(data).convert("RGB"))
    response = remove(client, jpeg_bytes(rgb), form={"model": "birefnet-general-lite"}, filename="input.jpg")
    assert response.status_code == 200, response.text
    assert response.content.startswith(b"\x89PNG")
    assert iou(np.asarray(open_image(response.content))[..., 3] >= 128, disc) >= 0.9


def test_only_mask_is_an_8_bit_mask_png(client):
    data, disc = red_disc_png()
    image = open_image(remove(client, data, form={"model": "birefnet-general", "om": "true"}).content)
    assert image.mode == "L" and image.size == (320, 240)
    assert iou(np.asarray(image) >= 128, disc) >= 0.9


def test_post_process_mask_makes_the_mask_binary(client):
    data, disc = red_disc_png()
    soft = np.asarray(open_image(remove(client, data, form={"model": "birefnet-general", "om": "true"}).content))
    hard = np.asarray(open_image(remove(client, data, form={"model": "birefnet-general", "om": "true",
                                                            "ppm": "true"}).content))
    assert len(np.unique(soft)) > 2
    assert set(np.unique(hard)) <= {0, 255}
    assert iou(hard == 255, disc) >= 0.9


def test_background_colour_fills_the_background_and_stays_rgba(client):
    data, disc = red_disc_png()
    response = remove(client, data, form={"model": "birefnet-general"}, params={"bgc": "0,255,0,255"})
    image = open_image(response.content)
    assert image.mode == "RGBA"
    pixels = np.asarray(image)
    assert tuple(pixels[5, 5]) == (0, 255, 0, 255)
    assert pixels[..., 3].min() == 255
    centre = pixels[120, 160].astype(int)
    assert centre[0] > 180 and centre[1] < 60


def test_a_translucent_background_colour_keeps_its_opacity(client):
    data, _ = red_disc_png()
    pixels = np.asarray(open_image(remove(client, data, params={"bgc": "0,0,255,128"}).content))
    assert tuple(pixels[5, 5]) == (0, 0, 255, 128)
    assert pixels[120, 160, 3] == 255


def test_alpha_matting_estimates_edge_colours_without_changing_the_mask(client):
    data, _ = red_disc_png()
    plain = np.asarray(open_image(remove(client, data, form={"model": "birefnet-general"}).content))
    matted = np.asarray(open_image(remove(client, data, form={"model": "birefnet-general", "a": "true",
                                                              "af": "240", "ab": "10", "ae": "10"}).content))
    assert np.array_equal(plain[..., 3], matted[..., 3])
    edge = (plain[..., 3] > 20) & (plain[..., 3] < 235)
    assert edge.any()
    # The naive cutout keeps the grey background's colour in the soft edge; the
    # estimate moves it toward the red disc.
    assert matted[edge, 0].mean() > plain[edge, 0].mean() + 10


def test_no_model_means_the_configured_default(client):
    data, _ = red_disc_png()
    response = remove(client, data)
    assert response.status_code == 200, response.text
    assert response.headers["x-model"] == "tiny"


def test_a_rembg_model_not_served_here_is_a_400_listing_those_that_are(client):
    data, _ = red_disc_png()
    for name in ("u2net", "bria-rmbg", "isnet-general-use"):
        assert_detail(remove(client, data, form={"model": name}), 400, name, "birefnet-general",
                      "birefnet-general-lite", "tiny", "classic")


def test_strata_model_names_are_accepted_too(client):
    data, _ = red_disc_png()
    response = remove(client, data, form={"model": "classic"})
    assert response.status_code == 200, response.text
    assert response.headers["x-engine"] == "classic"


def test_the_classic_engine_on_a_busy_photo_says_its_cutout_is_likely_wrong(client):
    from skimage.data import astronaut  # a real photo, bundled with scikit-image

    response = remove(client, jpeg_bytes(astronaut()), form={"model": "classic"}, filename="astronaut.jpg")
    assert response.status_code == 200, response.text
    assert "plain or gradient backdrops" in response.headers["x-engine-warning"]


def test_out_of_range_parameters_are_422_in_fastapis_shape(client):
    data, _ = red_disc_png()
    response = remove(client, data, form={"af": "300"}, params={"bgc": "red"})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert {tuple(error["loc"]) for error in errors} == {("body", "af"), ("query", "bgc")}
    assert all(error["msg"] for error in errors)


def test_a_request_without_the_file_field_is_422_naming_it(client):
    data, _ = red_disc_png()
    response = client.post("/api/remove", files={"image": ("input.png", data)})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "file"]


def test_a_corrupt_image_is_a_400_detail(client):
    data, _ = red_disc_png()
    assert_detail(remove(client, data[: len(data) // 2]), 400, "corrupt")


def test_extras_are_accepted_and_ignored(client):
    data, _ = red_disc_png()
    with_extras = remove(client, data, params={"extras": '{"putalpha": true}'})
    with_bad_json = remove(client, data, params={"extras": "{not json"})
    plain = remove(client, data)
    assert with_extras.status_code == with_bad_json.status_code == 200
    assert with_extras.content == plain.content == with_bad_json.content


def test_get_with_a_url_gives_the_cutout_of_that_image(client, images):
    by_url = client.get("/api/remove", params={"url": images.url("/image.png"), "model": "birefnet-general"})
    assert by_url.status_code == 200, by_url.text
    assert by_url.headers["content-type"] == "image/png"
    assert by_url.content == remove(client, IMAGE, form={"model": "birefnet-general"}).content


def test_get_takes_rembgs_parameters_in_the_query(client, images):
    response = client.get("/api/remove", params={"url": images.url("/image.png"), "om": "true", "ppm": "true"})
    mask = open_image(response.content)
    assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}


def test_get_without_a_url_is_422_naming_it(client):
    response = client.get("/api/remove")
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "url"]


def test_a_url_that_cannot_be_fetched_is_a_detail_error(client, images):
    assert_detail(client.get("/api/remove", params={"url": images.url("/status/503")}), 422, "503")
    assert_detail(client.get("/api/remove", params={"url": f"http://0.0.0.0:{images.port}/image.png"}), 422)


# -- the model mapping in the config (no Ray needed)


def local_args() -> dict:
    from tests.conftest import load_config

    return load_config("local.yaml")["applications"][0]["args"]


def test_local_yaml_maps_rembgs_birefnet_names_and_bria_rmbg():
    from serve_app.config import AppConfig

    models = AppConfig.model_validate(local_args()).rembg_models()
    assert models["birefnet-general"] == models["birefnet-portrait"] == "birefnet"
    assert models["bria-rmbg"] == "rmbg"


def test_a_mapping_to_a_model_not_served_is_a_startup_error():
    from serve_app.config import AppConfig

    args = local_args()
    args["compat"]["rembg_models"]["u2net"] = "u2net"
    with pytest.raises(ValueError, match="'u2net' to 'u2net'"):
        AppConfig.model_validate(args)


def test_without_a_mapping_the_defaults_cover_the_models_served():
    from serve_app.config import AppConfig

    args = local_args()
    del args["compat"], args["segmentation"]["rmbg"]
    models = AppConfig.model_validate(args).rembg_models()
    assert models["birefnet-general"] == "birefnet" and "bria-rmbg" not in models
