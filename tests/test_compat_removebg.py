"""The remove.bg API v1.0 answered by Strata, over real HTTP on a real local Ray.

Requests are made as remove.bg's documentation shows them: `POST /v1.0/removebg`
with the `X-Api-Key` header and `image_file` as a multipart file (its curl
sample: `-F image_file=@file.jpg -F size=auto`), or `image_file_b64` in a JSON
or URL-encoded body. The default model is the tiny BiRefNet of
configs/test.yaml, which calls saturated red pixels foreground.
"""

from __future__ import annotations

import base64
import io
import zipfile

import numpy as np
import pytest

from tests.image_server import ImageServer
from tests.test_remove_background_api import iou, open_image, png_bytes, red_disc_png

KEY = {"X-Api-Key": "INSERT_YOUR_API_KEY_HERE"}


def removebg(client, data: bytes | None = None, headers=None, **fields):
    files = {"image_file": ("file.png", data, "image/png")} if data is not None else None
    return client.post("/v1.0/removebg", headers={**KEY, **(headers or {})}, files=files,
                       data={name: str(value) for name, value in fields.items()})


def assert_error(response, code: str, status: int = 400):
    """remove.bg's error body: {"errors": [{"title", "code", ...}]}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    errors = response.json()["errors"]
    assert len(errors) == 1 and errors[0]["code"] == code and errors[0]["title"]
    return errors[0]


def disc_box(disc: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, width, height) of the true disc."""
    ys, xs = np.nonzero(disc)
    return ys.min(), xs.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def test_the_documented_curl_call_gives_a_png_cutout_and_the_headers(client):
    data, disc = red_disc_png(320, 240)
    response = removebg(client, data, size="auto")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = open_image(response.content)
    assert image.mode == "RGBA" and image.size == (320, 240)
    assert (response.headers["x-width"], response.headers["x-height"]) == ("320", "240")
    assert float(response.headers["x-credits-charged"]) == 0
    assert iou(np.asarray(image)[..., 3] >= 128, disc) >= 0.9
    top, left, width, height = disc_box(disc)
    found = [int(response.headers[f"x-foreground-{side}"]) for side in ("top", "left", "width", "height")]
    assert np.abs(np.array(found) - (top, left, width, height)).max() <= 4


def test_the_default_size_is_a_preview_of_at_most_a_quarter_megapixel(client):
    data, disc = red_disc_png(800, 600)
    response = removebg(client, data)
    image = open_image(response.content)
    assert image.width * image.height <= 250_000 and image.size == (577, 433)
    assert (response.headers["x-width"], response.headers["x-height"]) == ("577", "433")
    full = open_image(removebg(client, data, size="full").content)
    assert full.size == (800, 600)


def test_a_base64_image_in_a_json_body_is_accepted(client):
    data, disc = red_disc_png()
    response = client.post("/v1.0/removebg", headers=KEY, json={
        "image_file_b64": base64.b64encode(data).decode(), "size": "auto",
        # remove.bg's own JSON example sends the unused sources as empty strings.
        "image_url": "", "bg_color": "", "crop": False})
    assert response.status_code == 200, response.text
    assert iou(np.asarray(open_image(response.content))[..., 3] >= 128, disc) >= 0.9


def test_a_base64_image_in_a_url_encoded_body_is_accepted(client):
    data, _ = red_disc_png()
    response = client.post("/v1.0/removebg", headers=KEY,
                           data={"image_file_b64": base64.b64encode(data).decode(), "size": "auto"})
    assert response.status_code == 200, response.text
    assert open_image(response.content).size == (320, 240)


def test_accept_json_gives_the_result_as_base64_with_the_foreground_box(client):
    data, disc = red_disc_png()
    response = removebg(client, data, headers={"Accept": "application/json"}, size="auto")
    assert response.headers["content-type"] == "application/json"
    body = response.json()["data"]
    image = open_image(base64.b64decode(body["result_b64"]))
    assert image.mode == "RGBA" and image.size == (320, 240)
    assert body["foreground_width"] == int(response.headers["x-foreground-width"])
    assert {"foreground_top", "foreground_left", "foreground_height"} <= set(body)


def test_format_jpg_is_the_subject_on_white(client):
    data, _ = red_disc_png()
    response = removebg(client, data, size="auto", format="jpg")
    assert response.headers["content-type"] == "image/jpeg"
    pixels = np.asarray(open_image(response.content))
    assert pixels.shape == (240, 320, 3)
    assert pixels[5, 5].min() >= 250
    assert pixels[120, 160, 0] > 180 and pixels[120, 160, 1] < 60


def test_format_zip_holds_color_jpg_and_alpha_png(client):
    data, disc = red_disc_png()
    response = removebg(client, data, size="auto", format="zip")
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert sorted(archive.namelist()) == ["alpha.png", "color.jpg"]
        color = open_image(archive.read("color.jpg"))
        alpha = open_image(archive.read("alpha.png"))
    assert color.mode == "RGB" and alpha.mode == "L" and color.size == alpha.size == (320, 240)
    assert iou(np.asarray(alpha) >= 128, disc) >= 0.9
    # Edge colours are corrected: the soft edge is the disc's red, not the grey behind it.
    edge = (np.asarray(alpha) > 40) & (np.asarray(alpha) < 215) & ~disc
    assert edge.any() and np.asarray(color)[edge, 0].mean() > 170


def test_channels_alpha_is_the_8_bit_matte(client):
    data, disc = red_disc_png()
    response = removebg(client, data, size="auto", channels="alpha")
    image = open_image(response.content)
    assert response.headers["content-type"] == "image/png" and image.mode == "L"
    assert iou(np.asarray(image) >= 128, disc) >= 0.9


def test_an_opaque_bg_color_makes_auto_a_jpg_of_that_colour(client):
    data, _ = red_disc_png()
    response = removebg(client, data, size="auto", bg_color="81d4fa")
    assert response.headers["content-type"] == "image/jpeg"
    corner = np.asarray(open_image(response.content))[5, 5].astype(int)
    assert np.abs(corner - (0x81, 0xD4, 0xFA)).max() <= 3


@pytest.mark.parametrize("colour, rgb", [("green", (0, 128, 0)), ("fff", (255, 255, 255))])
def test_bg_color_takes_names_and_short_hex(client, colour, rgb):
    data, _ = red_disc_png()
    response = removebg(client, data, size="auto", bg_color=colour, format="png")
    assert tuple(np.asarray(open_image(response.content))[5, 5]) == rgb


def test_an_8_digit_bg_color_is_a_translucent_background(client):
    data, _ = red_disc_png()
    response = removebg(client, data, size="auto", bg_color="0000ff80")
    assert response.headers["content-type"] == "image/png"
    assert tuple(np.asarray(open_image(response.content))[5, 5]) == (0, 0, 255, 128)


def test_crop_trims_to_the_subject_and_crop_margin_adds_room(client):
    data, disc = red_disc_png()
    _, _, width, height = disc_box(disc)
    cropped = removebg(client, data, size="auto", crop="true")
    assert abs(int(cropped.headers["x-width"]) - width) <= 4
    assert cropped.headers["x-foreground-top"] == cropped.headers["x-foreground-left"] == "0"
    margin = removebg(client, data, size="auto", crop="true", crop_margin="10px")
    image = open_image(margin.content)
    assert image.size == (int(cropped.headers["x-width"]) + 20, int(cropped.headers["x-height"]) + 20)
    assert margin.headers["x-foreground-top"] == margin.headers["x-foreground-left"] == "10"
    assert np.asarray(image)[:10, :, 3].max() == 0


def test_crop_margin_takes_percentages_and_per_side_values(client):
    data, _ = red_disc_png()
    cropped = removebg(client, data, size="auto", crop="true")
    w, h = int(cropped.headers["x-width"]), int(cropped.headers["x-height"])
    relative = removebg(client, data, size="auto", crop="true", crop_margin="10%")
    assert open_image(relative.content).size == (w + 2 * round(w * 0.1), h + 2 * round(h * 0.1))
    sides = removebg(client, data, size="auto", crop="true", crop_margin="0px 5px 20px 30px")
    assert open_image(sides.content).size == (w + 35, h + 20)
    # At most half the subject's size a side.
    capped = removebg(client, data, size="auto", crop="true", crop_margin="400px")
    assert open_image(capped.content).size == (w + 2 * round(w / 2), h + 2 * round(h / 2))


def test_roi_makes_everything_outside_it_background(client):
    data, disc = red_disc_png()
    response = removebg(client, data, size="auto", roi="0% 0% 50% 100%")
    alpha = np.asarray(open_image(response.content))[..., 3]
    assert alpha[:, 160:].max() == 0
    assert iou(alpha[:, :160] >= 128, disc[:, :160]) >= 0.9


def test_type_is_echoed_in_x_type_and_absent_for_auto(client):
    data, _ = red_disc_png()
    assert removebg(client, data, size="auto", type="product").headers["x-type"] == "product"
    assert "x-type" not in removebg(client, data, size="auto").headers


def test_a_request_without_an_image_is_missing_source(client):
    error = assert_error(removebg(client, size="auto"), "missing_source")
    assert "image_file" in error["detail"]


def test_two_image_sources_are_multiple_sources(client):
    data, _ = red_disc_png()
    assert_error(removebg(client, data, image_file_b64=base64.b64encode(data).decode()), "multiple_sources")


@pytest.mark.parametrize("field, value, code", [
    ("size", "huge", "invalid_size"),
    ("format", "gif", "invalid_format"),
    ("channels", "rgb", "invalid_channels"),
    ("bg_color", "not-a-colour", "invalid_bg_color"),
    ("crop_margin", "ten", "invalid_crop_margin"),
    ("roi", "0 0 100%", "invalid_roi"),
    ("roi", "0% 0% 200% 100%", "roi_exceeds_bounds"),
    ("roi", "50% 0% 50% 100%", "roi_region_empty"),
    ("scale", "50%", "unsupported_parameter"),
])
def test_bad_parameters_are_400_with_remove_bgs_code(client, field, value, code):
    data, _ = red_disc_png()
    assert_error(removebg(client, data, **{field: value}), code)


# -- background images: bg_image_file, bg_image_url ------------------------------------


def framed_background(width=100, height=100, frame=10) -> np.ndarray:
    """A white image with a black frame `frame` px wide: where its edges land in the
    result shows how it was scaled and placed."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[frame:-frame, frame:-frame] = 255
    return rgb


def halves_background(width=320, height=240) -> np.ndarray:
    """Green on the left, blue on the right."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2] = (0, 200, 0)
    rgb[:, width // 2 :] = (0, 0, 200)
    return rgb


def with_background(client, background: bytes | None, data: bytes | None = None, **fields):
    """A remove.bg request of the red disc with `background` as the bg_image_file file."""
    files = {"image_file": ("file.png", data or red_disc_png()[0], "image/png")}
    if background is not None:
        files["bg_image_file"] = ("bg.png", background, "image/png")
    return client.post("/v1.0/removebg", headers=KEY, files=files,
                       data={name: str(value) for name, value in fields.items()})


def test_a_background_image_file_shows_behind_the_subject(client):
    response = with_background(client, png_bytes(halves_background()), size="auto", format="png")
    assert response.status_code == 200, response.text
    pixels = np.asarray(open_image(response.content))
    assert pixels.shape == (240, 320, 3)  # opaque: no alpha channel
    assert tuple(pixels[10, 10]) == (0, 200, 0) and tuple(pixels[10, 310]) == (0, 0, 200)
    assert pixels[120, 160, 0] > 180 and pixels[120, 160, 2] < 80  # the red disc in front


def test_with_an_opaque_background_image_format_auto_gives_a_jpg(client):
    response = with_background(client, png_bytes(halves_background()), size="auto")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert open_image(response.content).size == (320, 240)


def test_a_background_of_another_aspect_is_scaled_to_cover_the_canvas_and_centered(client):
    # 100x100 onto 320x240: scaled 3.2x to 320x320, 40 rows cut off at the top and the
    # bottom; the 10 px frame becomes 32 px: whole at the left and right, gone above and below.
    response = with_background(client, png_bytes(framed_background()), size="auto", format="png")
    assert response.status_code == 200, response.text
    pixels = np.asarray(open_image(response.content)).astype(int)
    assert pixels[120, 2].max() < 40 and pixels[120, 29].max() < 40  # the left frame, 32 px wide
    assert pixels[120, 317].max() < 40 and pixels[120, 290].max() < 40  # the right one
    assert pixels[120, 36].min() > 215 and pixels[120, 283].min() > 215  # inside the frame
    assert pixels[2, 160].min() > 215 and pixels[237, 160].min() > 215  # top and bottom frames cut off


def test_a_translucent_background_image_keeps_its_transparency(client):
    background = np.zeros((240, 320, 4), np.uint8)
    background[...] = (0, 0, 200, 128)
    response = with_background(client, png_bytes(background), size="auto")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    pixels = np.asarray(open_image(response.content))
    assert tuple(pixels[10, 10]) == (0, 0, 200, 128)
    assert pixels[120, 160, 3] == 255


@pytest.fixture(scope="module")
def backgrounds():
    """A local web server with the green and blue halves at /image.png."""
    with ImageServer(png_bytes(halves_background())) as server:
        yield server


def test_a_background_image_url_gives_the_same_result_as_the_file(client, backgrounds):
    data, _ = red_disc_png()
    by_url = removebg(client, data, bg_image_url=backgrounds.url("/image.png"), size="auto", format="png")
    assert by_url.status_code == 200, by_url.text
    by_file = with_background(client, png_bytes(halves_background()), size="auto", format="png")
    assert by_url.content == by_file.content


def test_a_background_url_that_fails_is_failed_bg_download(client, backgrounds):
    url = backgrounds.url("/status/503")
    error = assert_error(removebg(client, red_disc_png()[0], bg_image_url=url), "failed_bg_download")
    assert url in error["title"]


def test_a_background_url_that_is_not_a_url_is_invalid_bg_image_url(client):
    assert_error(removebg(client, red_disc_png()[0], bg_image_url="not a url"), "invalid_bg_image_url")


def test_a_corrupt_background_file_is_failed_to_read_image_naming_the_background(client):
    background = png_bytes(halves_background())
    error = assert_error(with_background(client, background[: len(background) // 2]), "failed_to_read_image")
    assert "background image" in error["detail"]


def test_a_background_file_sent_as_text_is_refused_not_ignored(client):
    error = assert_error(removebg(client, red_disc_png()[0], bg_image_file="bg.png"), "invalid_bg_image_file")
    assert "multipart" in error["detail"]


@pytest.mark.parametrize("fields, file", [
    ({"bg_color": "fff"}, True),
    ({"bg_color": "fff", "bg_image_file": "bg.png"}, False),
    ({"bg_color": "fff", "bg_image_url": "http://127.0.0.1:9/bg.png"}, False),
    ({"bg_image_url": "http://127.0.0.1:9/bg.png"}, True),
], ids=["color+file", "color+file-as-text", "color+url", "url+file"])
def test_two_background_sources_are_multiple_bg_sources(client, fields, file):
    background = png_bytes(halves_background()) if file else None
    assert_error(with_background(client, background, **fields), "multiple_bg_sources")


def test_an_empty_background_file_part_is_no_background(client):
    # What a browser's form sends for a file input left blank.
    response = with_background(client, b"", size="auto")
    assert response.status_code == 200, response.text
    assert open_image(response.content).mode == "RGBA"


def test_a_corrupt_file_is_failed_to_read_image(client):
    data, _ = red_disc_png()
    assert_error(removebg(client, data[: len(data) // 2]), "failed_to_read_image")


def test_a_file_that_is_not_an_image_is_invalid_file_type(client):
    assert_error(removebg(client, b"GIF89a" + bytes(64)), "invalid_file_type")


def test_an_image_without_a_foreground_is_unknown_foreground(client):
    data, _ = red_disc_png()
    grey = np.asarray(open_image(data).convert("RGB")).copy()
    grey[:] = 128
    assert_error(removebg(client, png_bytes(grey), size="auto"), "unknown_foreground")


@pytest.fixture(scope="module")
def images():
    """A local web server with the red disc at /image.png (configs/test.yaml lets
    the ingress fetch from 127.0.0.1; production configs refuse private addresses)."""
    with ImageServer(red_disc_png()[0]) as server:
        yield server


def test_an_image_url_gives_the_same_result_as_the_file(client, images):
    data, _ = red_disc_png()
    by_url = removebg(client, image_url=images.url("/image.png"), size="auto")
    assert by_url.status_code == 200, by_url.text
    assert by_url.content == removebg(client, data, size="auto").content


def test_an_image_url_that_fails_is_failed_image_download(client, images):
    url = images.url("/status/503")
    error = assert_error(removebg(client, image_url=url), "failed_image_download")
    assert url in error["title"]


def test_an_image_url_that_is_not_a_url_is_invalid_image_url(client):
    assert_error(removebg(client, image_url="not a url"), "invalid_image_url")


# -- API keys (serve_app/access.py) on these routes, without Ray: the middleware
# runs around a small app with the ingress's own refusal shapes.


def secured_app():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serve_app.access import AccessControl, AccessMiddleware, parse_keys
    from serve_app.ingress import COMPAT_REFUSALS

    async def ok(request):
        return PlainTextResponse("ok")

    access = AccessControl(parse_keys(["the-right-key"], "test"), rate_limit="2/minute")
    app = Starlette(routes=[Route("/v1.0/removebg", ok, methods=["POST"]), Route("/api/remove", ok, methods=["POST"])])
    app.add_middleware(AccessMiddleware, access=lambda: access, refusals=COMPAT_REFUSALS)
    return TestClient(app)


def test_without_a_key_remove_bg_answers_403_missing_api_key():
    response = secured_app().post("/v1.0/removebg")
    assert response.status_code == 403 and response.json()["errors"][0]["title"] == "Missing API Key"


def test_a_wrong_key_is_403_invalid_api_key_and_the_right_one_passes():
    app = secured_app()
    wrong = app.post("/v1.0/removebg", headers={"X-Api-Key": "nope"})
    assert wrong.status_code == 403 and wrong.json()["errors"][0]["title"] == "Invalid API Key"
    assert app.post("/v1.0/removebg", headers={"X-Api-Key": "the-right-key"}).text == "ok"


def test_past_the_rate_limit_remove_bg_answers_429_with_retry_after():
    app = secured_app()
    for _ in range(2):
        assert app.post("/v1.0/removebg", headers={"X-Api-Key": "the-right-key"}).status_code == 200
    response = app.post("/v1.0/removebg", headers={"X-Api-Key": "the-right-key"})
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.json()["errors"][0]["title"] == "Rate limit exceeded"


def test_rembg_routes_refuse_in_fastapis_detail_shape():
    response = secured_app().post("/api/remove")
    assert response.status_code == 401 and "API key" in response.json()["detail"]


def test_the_removebg_python_clients_default_fields_are_accepted(client):
    # What `removebg` (PyPI) sends for remove_background_from_img_file(path) with its defaults.
    data, disc = red_disc_png()
    response = removebg(client, data, size="regular", type="auto", type_level="none", format="auto",
                        roi="0 0 100% 100%", crop="false", scale="original", position="original",
                        channels="rgba", add_shadow="false", semitransparency="true")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and "x-type" not in response.headers
    assert iou(np.asarray(open_image(response.content))[..., 3] >= 128, disc) >= 0.9
