"""The Python client (serve_app/client.py) against Strata served on a real local
Ray (configs/test.yaml), over real HTTP. A few tests replace the network with
httpx.MockTransport where the served app cannot show the behaviour (it checks
no API key and its queues do not fill on demand); they say so."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image
from pptx import Presentation
from psd_tools import PSDImage

from serve_app.client import AsyncStrataClient, Cutout, Job, Progress, StrataClient, StrataError
from tests.conftest import ROOT
from tests.images import flat_design
from tests.test_remove_background_api import iou, open_image, png_bytes, red_disc_png


@pytest.fixture
def strata_client(strata):
    with StrataClient(strata, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def design_png() -> bytes:
    rgb, _ = flat_design(480, 360, seed=1)
    return png_bytes(rgb)


@pytest.fixture
def finished_job(strata_client, design_png) -> Job:
    job = strata_client.decompose(design_png, model="classic", layers=3)
    assert job.status == "succeeded", job.error
    return job


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- importing -------------------------------------------------------------------


def test_the_client_imports_neither_torch_nor_ray():
    code = ("import sys, serve_app.client, serve_app.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.stdout.strip() == "[]"


# -- remove_background ----------------------------------------------------------


def test_remove_background_gives_an_rgba_png_of_the_input_size(strata_client):
    data, disc = red_disc_png(320, 240)
    cutout = strata_client.remove_background(data, model="tiny")
    assert isinstance(cutout, Cutout)
    assert cutout.media_type == "image/png"
    image = open_image(cutout.data)
    assert image.format == "PNG" and image.mode == "RGBA" and image.size == (320, 240)
    assert iou(np.asarray(image)[..., 3] >= 128, disc) >= 0.9


def test_a_cutout_carries_the_response_headers_as_fields(strata_client):
    data, _ = red_disc_png(320, 240)
    cutout = strata_client.remove_background(data, model="tiny")
    assert (cutout.model, cutout.engine) == ("tiny", "birefnet")
    assert (cutout.width, cutout.height) == (320, 240)
    assert cutout.batch_size >= 1 and cutout.processing_ms > 0
    assert cutout.request_id


def test_remove_background_reads_a_path_and_sends_the_options(strata_client, tmp_path):
    data, _ = red_disc_png(320, 240)
    source = tmp_path / "disc.png"
    source.write_bytes(data)
    mask = strata_client.remove_background(source, model="tiny", output="mask")
    image = open_image(mask.data)
    assert image.mode == "L" and image.size == (320, 240)
    on_green = open_image(strata_client.remove_background(str(source), model="tiny", bg_color="#00FF00").data)
    assert on_green.mode == "RGB" and tuple(np.asarray(on_green)[5, 5]) == (0, 255, 0)
    cropped = strata_client.remove_background(source, model="tiny", crop=True, format="webp")
    assert cropped.media_type == "image/webp" and cropped.width < 320


def test_a_cutout_saves_to_a_new_folder(strata_client, tmp_path):
    data, _ = red_disc_png(320, 240)
    path = strata_client.remove_background(data, model="tiny").save(tmp_path / "new" / "out.png")
    assert open_image(path.read_bytes()).size == (320, 240)
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]


# -- errors ------------------------------------------------------------------------


def test_a_corrupt_image_raises_strata_error_with_the_problem_detail(strata_client, client):
    data, _ = red_disc_png(320, 240)
    truncated = data[: len(data) // 2]
    expected = client.post("/v1/remove-background", files={"image": ("a.png", truncated)}).json()
    with pytest.raises(StrataError) as caught:
        strata_client.remove_background(truncated)
    error = caught.value
    assert error.status == 400
    assert error.title == expected["title"] and error.detail == expected["detail"]
    assert error.problem["type"] == expected["type"] and error.request_id
    assert error.detail in str(error)


def test_an_unknown_model_raises_strata_error_naming_the_served_ones(strata_client):
    data, _ = red_disc_png(320, 240)
    with pytest.raises(StrataError) as caught:
        strata_client.remove_background(data, model="no-such-model")
    assert caught.value.status == 422
    assert "no-such-model" in caught.value.detail and "tiny" in caught.value.detail


def test_a_missing_job_raises_strata_error_404(strata_client):
    with pytest.raises(StrataError) as caught:
        strata_client.job("0123456789abcdef0123")
    assert caught.value.status == 404 and "0123456789abcdef0123" in caught.value.detail


def test_an_unreachable_server_raises_strata_error_without_a_status():
    with StrataClient(f"http://127.0.0.1:{_unused_port()}", timeout=5) as unreachable, \
            pytest.raises(StrataError) as caught:
        unreachable.health()
    assert caught.value.status is None and caught.value.title == "Connection failed"


# -- decompose, jobs -----------------------------------------------------------------


def test_decompose_reports_progress_and_returns_the_layers(strata_client):
    rgb, _ = flat_design(1024, 768, seed=2)  # large enough that the model's steps take a while
    seen: list[Progress] = []
    job = strata_client.decompose(png_bytes(rgb), model="classic", layers=4, on_progress=seen.append)
    assert job.status == "succeeded" and job.terminal
    assert [layer.index for layer in job.result.layers] == [1, 2, 3, 4]
    assert (job.result.width, job.result.height) == (1024, 768)
    assert seen, "no progress was reported"
    assert all(p.job_id == job.id for p in seen)
    assert any(p.status == "running" and p.total_steps and 0 < p.step < p.total_steps for p in seen)
    steps = [p.step for p in seen if p.step is not None]
    assert steps == sorted(steps)
    assert seen[-1].status == "succeeded" and seen[-1].progress == 1.0 and seen[-1].terminal


def test_decompose_without_wait_returns_the_accepted_job(strata_client, design_png):
    job = strata_client.decompose(design_png, model="classic", layers=2, wait=False)
    assert job.status in ("queued", "running", "succeeded")
    assert job.params["layers"] == 2 and job.params["model"] == "classic"
    finished = strata_client.wait(job.id)
    assert finished.id == job.id and finished.status == "succeeded"


def test_waiting_on_a_finished_job_returns_it_at_once(strata_client, finished_job):
    seen: list[Progress] = []
    assert strata_client.wait(finished_job, on_progress=seen.append).status == "succeeded"
    assert [p.status for p in seen] == ["succeeded"]


def test_invalid_layer_parameters_raise_strata_error(strata_client, design_png):
    with pytest.raises(StrataError) as caught:
        strata_client.decompose(design_png, model="classic", layers=11)
    assert caught.value.status == 422 and "layers" in caught.value.detail


def test_jobs_lists_a_finished_job(strata_client, finished_job):
    page = strata_client.jobs(status="succeeded", limit=100)
    assert finished_job.id in [job.id for job in page.jobs]
    assert all(job.status == "succeeded" for job in page.jobs)
    assert strata_client.job(finished_job.id).result.layers == finished_job.result.layers


def test_cancel_deletes_a_finished_job(strata_client, finished_job):
    assert strata_client.cancel(finished_job) is None
    with pytest.raises(StrataError) as caught:
        strata_client.job(finished_job.id)
    assert caught.value.status == 404


def test_cancel_of_a_running_job_ends_it_cancelled(strata_client):
    rgb, _ = flat_design(1600, 1200, seed=4)
    job = strata_client.decompose(png_bytes(rgb), model="classic", layers=5, wait=False)
    requested = strata_client.cancel(job)
    assert requested is not None and requested.cancel_requested
    assert strata_client.wait(job).status in ("cancelled", "succeeded")  # it may have finished first


# -- downloads --------------------------------------------------------------------------


def test_a_layer_downloads_as_bytes_and_into_a_file(strata_client, client, finished_job, tmp_path):
    served = client.get(f"/v1/jobs/{finished_job.id}/layers/2.png").content
    assert strata_client.download(finished_job, 2) == served
    path = strata_client.download(finished_job.id, 2, tmp_path / "sub" / "layer.png")
    assert path.read_bytes() == served
    assert [p.name for p in path.parent.iterdir()] == ["layer.png"]  # no partial file left beside it


def test_zip_psd_and_manifest_download(strata_client, finished_job, tmp_path):
    with zipfile.ZipFile(strata_client.download(finished_job, "zip", tmp_path / "r.zip")) as archive:
        assert archive.namelist() == ["layer_01.png", "layer_02.png", "layer_03.png", "manifest.json"]
    psd = PSDImage.open(strata_client.download(finished_job, "psd", tmp_path / "r.psd"))
    assert [layer.name for layer in psd] == [layer.name for layer in finished_job.result.layers]
    manifest = json.loads(strata_client.download(finished_job, "manifest"))
    assert manifest["job_id"] == finished_job.id and manifest["layer_count"] == 3


def test_the_pptx_holds_the_layer_pngs_in_stacking_order(strata_client, finished_job):
    deck = Presentation(io.BytesIO(strata_client.download(finished_job, "pptx")))
    (slide,) = deck.slides
    pictures = list(slide.shapes)
    assert [shape.name for shape in pictures] == [layer.name for layer in finished_job.result.layers]
    assert deck.slide_width * finished_job.result.height == deck.slide_height * finished_job.result.width
    for shape, layer in zip(pictures, finished_job.result.layers):
        assert (shape.left, shape.top, shape.width, shape.height) == (0, 0, deck.slide_width, deck.slide_height)
        assert shape.image.blob == strata_client.download(finished_job, layer.index)


def test_the_pptx_is_built_once(strata_client, finished_job):
    assert strata_client.download(finished_job, "pptx") == strata_client.download(finished_job, "pptx")


def test_results_of_an_unfinished_job_raise_404(strata_client):
    rgb, _ = flat_design(1600, 1200, seed=5)
    job = strata_client.decompose(png_bytes(rgb), model="classic", layers=5, wait=False)
    try:
        with pytest.raises(StrataError) as caught:
            strata_client.download(job, "pptx")
        assert caught.value.status == 404
    finally:
        strata_client.wait(job)


def test_an_unknown_download_kind_is_refused(strata_client, finished_job):
    with pytest.raises(ValueError, match="pdf"):
        strata_client.download(finished_job, "pdf")


# -- health --------------------------------------------------------------------------


def test_health_lists_the_served_models(strata_client):
    report = strata_client.health()
    assert report.default_model == "tiny" and report.default_layer_model == "classic"
    assert set(report.models) == {"tiny", "classic"}
    assert set(report.layer_models) == {"tiny-qwen", "classic"}
    assert report.models["classic"].engine == "classic" and report.models["tiny"].loaded


# -- async -----------------------------------------------------------------------------


def test_the_async_client_removes_backgrounds_concurrently(strata):
    async def run() -> list[Cutout]:
        async with AsyncStrataClient(strata, timeout=120) as strata_client:
            images = [red_disc_png(160 + 16 * i, 120)[0] for i in range(4)]
            return await asyncio.gather(*(strata_client.remove_background(data, model="tiny") for data in images))

    cutouts = asyncio.run(run())
    assert [(c.width, c.height) for c in cutouts] == [(160 + 16 * i, 120) for i in range(4)]
    assert all(open_image(c.data).mode == "RGBA" for c in cutouts)


def test_the_async_client_decomposes_with_progress_and_downloads(strata, design_png, tmp_path):
    seen: list[Progress] = []

    async def run() -> Job:
        async with AsyncStrataClient(strata, timeout=120) as strata_client:
            job = await strata_client.decompose(design_png, model="classic", layers=3, on_progress=seen.append)
            await strata_client.download(job, 1, tmp_path / "layer_01.png")
            await strata_client.download(job, "pptx", tmp_path / "layers.pptx")
            return job

    job = asyncio.run(run())
    assert job.status == "succeeded" and len(job.result.layers) == 3
    assert seen[-1].status == "succeeded"
    layer = Image.open(tmp_path / "layer_01.png")
    assert layer.mode == "RGBA" and layer.size == (480, 360)
    assert len(list(Presentation(str(tmp_path / "layers.pptx")).slides[0].shapes)) == 3


def test_the_async_client_raises_strata_error_with_the_problem_detail(strata):
    async def run() -> None:
        async with AsyncStrataClient(strata) as strata_client:
            await strata_client.remove_background(b"plain text, not an image")

    with pytest.raises(StrataError) as caught:
        asyncio.run(run())
    assert caught.value.status == 415 and caught.value.problem["status"] == 415


# -- settings (MockTransport: the served app checks no key) ------------------------------


def _recording_transport(seen: list[httpx.Request], responses: list[httpx.Response] | None = None):
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if responses:
            return responses.pop(0)
        return httpx.Response(200, json={"jobs": [], "next_cursor": None})
    return httpx.MockTransport(handle)


def test_an_api_key_is_sent_as_a_bearer_token():
    seen: list[httpx.Request] = []
    with StrataClient("http://strata.test", api_key="k-123", transport=_recording_transport(seen)) as client:
        client.jobs()
    assert seen[0].headers["authorization"] == "Bearer k-123"
    assert str(seen[0].url) == "http://strata.test/v1/jobs?limit=20"


def test_the_server_and_key_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("STRATA_URL", "http://from-env.test:9000/")
    monkeypatch.setenv("STRATA_API_KEY", "env-key")
    seen: list[httpx.Request] = []
    with StrataClient(transport=_recording_transport(seen)) as client:
        assert client.base_url == "http://from-env.test:9000"
        client.jobs()
    assert seen[0].headers["authorization"] == "Bearer env-key"


def test_without_a_key_no_authorization_is_sent(monkeypatch):
    monkeypatch.delenv("STRATA_API_KEY", raising=False)
    monkeypatch.delenv("STRATA_URL", raising=False)
    seen: list[httpx.Request] = []
    with StrataClient(transport=_recording_transport(seen)) as client:
        assert client.base_url == "http://127.0.0.1:8000"
        client.jobs()
    assert "authorization" not in seen[0].headers


def test_a_busy_answer_is_retried_after_retry_after():
    busy = httpx.Response(503, headers={"Retry-After": "0"}, json={
        "type": "urn:strata:problem:busy", "title": "Busy", "status": 503, "detail": "full"})
    seen: list[httpx.Request] = []
    transport = _recording_transport(seen, [busy, httpx.Response(200, json={"jobs": [], "next_cursor": None})])
    with StrataClient("http://strata.test", transport=transport) as client:
        assert client.jobs().jobs == []
    assert len(seen) == 2


def test_busy_past_the_retries_raises_with_retry_after():
    def busy() -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "0"}, json={
            "type": "urn:strata:problem:busy", "title": "Busy", "status": 503, "detail": "the queue is full"})

    seen: list[httpx.Request] = []
    transport = _recording_transport(seen, [busy() for _ in range(3)])
    with StrataClient("http://strata.test", retries=2, transport=transport) as client, \
            pytest.raises(StrataError) as caught:
        client.jobs()
    assert len(seen) == 3
    assert caught.value.status == 503 and caught.value.retry_after == 0 and caught.value.detail == "the queue is full"


def test_an_error_page_that_is_not_problem_json_still_raises_strata_error():
    transport = _recording_transport([], [httpx.Response(502, text="<html>Bad gateway</html>")])
    with StrataClient("http://strata.test", transport=transport) as client, pytest.raises(StrataError) as caught:
        client.health()
    assert caught.value.status == 502 and "Bad gateway" in caught.value.detail
