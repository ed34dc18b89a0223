"""`image_url` on Strata's routes, over real HTTP on a real local Ray.

configs/test.yaml turns `url_inputs.allow_private_networks` on, so the ingress
may fetch from the local image server these tests start on 127.0.0.1; what is
refused without that opt-in is tested without Ray in tests/test_url_inputs.py.
"""

from __future__ import annotations

import pytest

from tests.image_server import ImageServer
from tests.test_layer_jobs_api import wait_for_end
from tests.test_remove_background_api import assert_problem, open_image, red_disc_png

IMAGE, DISC = red_disc_png(320, 240)
ROUTES = {"/v1/remove-background": {"model": "tiny"}, "/v1/layers": {"model": "classic", "layers": 2}}


@pytest.fixture(scope="module")
def images():
    with ImageServer(IMAGE) as server:
        yield server


def test_cutout_of_an_image_url_equals_the_cutout_of_the_upload(client, images):
    by_url = client.post("/v1/remove-background", params={"model": "tiny", "image_url": images.url("/image.png")})
    uploaded = client.post("/v1/remove-background", params={"model": "tiny"},
                           files={"image": ("disc.png", IMAGE, "image/png")})
    assert by_url.status_code == 200, by_url.text
    assert open_image(by_url.content).size == (320, 240)
    assert by_url.content == uploaded.content


def test_layer_job_of_an_image_url_succeeds(client, images):
    response = client.post("/v1/layers", params={"model": "classic", "layers": 2,
                                                 "image_url": images.url("/image.png")})
    assert response.status_code == 202, response.text
    job = wait_for_end(client, response.json()["id"])
    assert job["status"] == "succeeded" and job["result"]["width"] == 320
    assert "image_url" not in job["params"]  # a URL may carry a token: it is not kept with the job


@pytest.mark.parametrize("route", ROUTES)
def test_image_url_and_an_upload_together_are_refused(client, images, route):
    response = client.post(route, params={**ROUTES[route], "image_url": images.url("/image.png")},
                           files={"image": ("disc.png", IMAGE, "image/png")})
    assert_problem(response, 422, "not both")


@pytest.mark.parametrize("route", ROUTES)
def test_neither_an_upload_nor_an_image_url_is_refused(client, route):
    assert_problem(client.post(route, params=ROUTES[route]), 422, "image_url", "image")


def test_refused_address_answers_422_and_is_never_contacted(client, images):
    before = images.seen.connections
    response = client.post("/v1/remove-background", params={"image_url": f"http://0.0.0.0:{images.port}/image.png"})
    assert_problem(response, 422, "unspecified")
    assert images.seen.connections == before


def test_remote_server_error_answers_422_naming_its_status(client, images):
    response = client.post("/v1/remove-background", params={"image_url": images.url("/status/503")})
    assert_problem(response, 422, "503")


def test_url_that_is_not_an_image_answers_415(client, images):
    response = client.post("/v1/remove-background", params={"image_url": images.url("/status/200")})
    assert_problem(response, 415)


def test_openapi_declares_image_url_and_an_optional_body(client):
    paths = client.get("/openapi.json").json()["paths"]
    for route in ROUTES:
        operation = paths[route]["post"]
        assert "image_url" in {parameter["name"] for parameter in operation["parameters"]}
        assert operation["requestBody"]["required"] is False
        assert "408" in operation["responses"]
