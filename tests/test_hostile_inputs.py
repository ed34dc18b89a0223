"""The hostile-input corpus (tests/hostile_inputs.py) over real HTTP, on a real local Ray.

Every entry goes to every route that takes an image. Each must get the answer
its entry names: a result of the right size (for `/v1/layers`, a job that ends
`succeeded` with layers of that size), or a 4xx `application/problem+json` with
the named status and a readable detail. Nothing may get a 5xx, and the service
must still answer a good request after the whole corpus.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from PIL import Image

from tests.conftest import load_config
from tests.hostile_inputs import H, HostileInput, Limits, Part, W, build_corpus, jpeg, result
from tests.test_layer_jobs_api import wait_for_end

_LIMITS = load_config("test.yaml")["applications"][0]["args"]["limits"]
UPLOAD_TIMEOUT_S = float(_LIMITS["upload_timeout_s"])
CORPUS = build_corpus(Limits(max_upload_mb=_LIMITS["max_upload_mb"], max_pixels=_LIMITS["max_pixels"],
                             min_side=_LIMITS["min_side"]))

# Every route that takes an image, with the parameters it is called with.
# /v1/layers uses the classic engine (fast) and asks to wait for the job's end.
ROUTES = {
    "remove-background": ("/v1/remove-background", {}, {}),
    "layers": ("/v1/layers", {"model": "classic", "layers": 2}, {"Prefer": "wait=60"}),
}

# A trickling client sends a piece every TRICKLE_GAP_S, well inside the upload
# timeout, and takes longer in all than the timeout: it must be read to the end.
TRICKLE_PIECES = 8
TRICKLE_GAP_S = UPLOAD_TIMEOUT_S / 5
# Longest wait for any answer on a raw socket: a hang fails the test instead of stalling the suite.
SOCKET_BOUND_S = UPLOAD_TIMEOUT_S + 60


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    content: bytes

    def json(self):
        return json.loads(self.content)


def _pieces(body: bytes, count: int) -> list[bytes]:
    size = -(-len(body) // count)
    return [body[i:i + size] for i in range(0, len(body), size)]


def _trickle(body: bytes) -> Iterator[bytes]:
    for index, piece in enumerate(_pieces(body, TRICKLE_PIECES)):
        if index:
            time.sleep(TRICKLE_GAP_S)  # the client's pace is what is under test, not a wait for a condition
        yield piece


def _send_stalled(base_url: str, path: str, params: dict, body: bytes, content_type: str) -> Answer:
    """Announce the whole body, send half of it, then nothing: read whatever answer comes."""
    url = httpx.URL(base_url).join(path).copy_merge_params(params)
    head = (f"POST {url.raw_path.decode()} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((url.host, url.port), timeout=SOCKET_BOUND_S) as sock:
        sock.sendall(head + body[:len(body) // 2])
        response = http.client.HTTPResponse(sock)
        response.begin()
        content = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, content)


def send(client: httpx.Client, base_url: str, route: str, entry: HostileInput) -> Answer:
    path, params, extra_headers = ROUTES[route]
    body, content_type = entry.body_and_content_type()
    headers = dict(extra_headers)
    if content_type is not None:
        headers["Content-Type"] = content_type
    if entry.delivery == "stall":
        return _send_stalled(base_url, path, params, body, content_type)
    if entry.delivery == "whole":
        content = body
    elif entry.delivery == "chunked":  # no length up front: the limit must hold while streaming
        content = iter(_pieces(body, max(1, len(body) // (256 * 1024))))
    else:  # trickle, with its length announced as a browser would
        headers["Content-Length"] = str(len(body))
        content = _trickle(body)
    response = client.post(path, params=params, content=content, headers=headers)
    return Answer(response.status_code, dict(response.headers), response.content)


def assert_problem(answer: Answer, status: int) -> None:
    assert answer.status == status, (answer.status, answer.content[:500])
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["status"] == status and problem["title"] and problem["type"].startswith("urn:strata:problem:")
    assert isinstance(problem["detail"], str) and len(problem["detail"].split()) >= 3, problem["detail"]
    assert problem["request_id"] == answer.headers["x-request-id"]


def assert_cutout(answer: Answer, size: tuple[int, int]) -> None:
    assert answer.status == 200, answer.content[:500]
    assert answer.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(answer.content))
    image.load()
    assert image.mode == "RGBA" and image.size == size


def assert_layers_job_succeeds(client: httpx.Client, answer: Answer, size: tuple[int, int]) -> None:
    assert answer.status in (200, 202), answer.content[:500]
    job = answer.json()
    if job["status"] not in ("succeeded", "failed", "cancelled"):
        job = wait_for_end(client, job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert (job["result"]["width"], job["result"]["height"]) == size
    assert all((layer["width"], layer["height"]) == size for layer in job["result"]["layers"])
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204  # keep the data directory small


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("entry", CORPUS, ids=[entry.name for entry in CORPUS])
def test_hostile_input_gets_its_correct_answer(client, strata, route, entry):
    answer = send(client, strata, route, entry)
    assert answer.status < 500, answer.content[:500]
    if not entry.expected.is_result:
        assert_problem(answer, entry.expected.status)
    elif route == "layers":
        assert_layers_job_succeeds(client, answer, entry.expected.size)
    else:
        assert_cutout(answer, entry.expected.size)


def test_corpus_has_over_100_named_inputs_of_every_kind():
    assert len(CORPUS) > 100
    names = " ".join(entry.name for entry in CORPUS)
    for word in ("jpeg", "png", "webp", "bmp", "tiff", "truncated", "empty", "header", "compressible", "exif",
                 "icc", "animated", "apng", "cmyk", "16-bit", "1x1", "orientation", "zip", "html",
                 "content-type", "filename", "two-image-fields", "over-the-limit", "slow", "stalls"):
        assert word in names, word


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_good_request_still_succeeds_after_the_corpus(client, strata, route):
    good = HostileInput("good-jpeg", result(), parts=(Part(jpeg(), filename="photo.jpg", content_type="image/jpeg"),))
    answer = send(client, strata, route, good)
    if route == "layers":
        assert_layers_job_succeeds(client, answer, (W, H))
    else:
        assert_cutout(answer, (W, H))
