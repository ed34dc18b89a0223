"""Layer decomposition as durable jobs, over real HTTP on a real local Ray.

`classic` is the weights-free palette engine; `tiny-qwen` is a tiny
QwenImageLayeredPipeline built offline, driven through the real pipeline code.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage

from serve_app.config import JobsConfig
from serve_app.jobs import JobStore
from serve_app.layer_jobs import job_json
from tests.images import flat_design
from tests.test_remove_background_api import assert_problem, open_image, png_bytes, red_disc_png

QWEN = {"model": "tiny-qwen", "layers": 2, "steps": 3, "prompt": "a red disc on grey", "seed": 7}


def submit(client, data: bytes, headers=None, **params):
    return client.post("/v1/layers", params=params, files={"image": ("design.png", data, "image/png")},
                       headers=headers or {})


def wait_for_end(client, job_id: str, timeout_s: float = 120) -> dict:
    """The job once it reached a terminal state (polling a condition, bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not end within {timeout_s} s")


def sse_events(client, job_id: str):
    """(event, data) pairs of the job's event stream, until the server closes it."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event, data = None, []
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data.append(line.split(":", 1)[1].strip())
            elif line == "" and event is not None:
                yield event, json.loads("\n".join(data))
                event, data = None, []


def stack(layers: list[np.ndarray]) -> np.ndarray:
    """Alpha-over composite, first layer at the bottom, as float RGB."""
    out = np.zeros(layers[0].shape[:2] + (3,), np.float64)
    for layer in layers:
        alpha = layer[..., 3:4] / 255.0
        out = layer[..., :3] * alpha + out * (1 - alpha)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def design():
    rgb, masks = flat_design(320, 240, seed=3)
    return rgb, masks


@pytest.fixture
def finished_classic_job(client, design):
    rgb, _ = design
    response = submit(client, png_bytes(rgb), headers={"Prefer": "wait=60"}, model="classic", layers=4)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_job_is_accepted_with_202_and_its_location(client, design):
    response = submit(client, png_bytes(design[0]), model="classic", layers=3)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running", "succeeded") and job["kind"] == "layers"
    assert job["params"]["layers"] == 3
    assert wait_for_end(client, job["id"])["status"] == "succeeded"


def test_prefer_wait_answers_200_with_the_finished_job(finished_classic_job):
    job = finished_classic_job
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert job["result"]["engine"] == "classic"


def test_layers_come_back_to_front_and_stack_back_into_the_input(client, design, finished_classic_job):
    rgb, _ = design
    layers_info = finished_classic_job["result"]["layers"]
    assert [entry["index"] for entry in layers_info] == [1, 2, 3, 4]
    layers = []
    for entry in layers_info:
        response = client.get(entry["url"])
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = open_image(response.content)
        assert image.mode == "RGBA" and image.size == (320, 240)
        layers.append(np.asarray(image))
    assert (layers[0][..., 3] == 255).all()  # the background is opaque
    assert psnr(stack(layers), rgb) >= 40


def test_zip_holds_one_png_per_layer_in_order_and_the_manifest(client, finished_classic_job):
    response = client.get(finished_classic_job["result"]["zip_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    pngs = [name for name in archive.namelist() if name.endswith(".png")]
    assert pngs == ["layer_01.png", "layer_02.png", "layer_03.png", "layer_04.png"]
    manifest = json.loads(archive.read("manifest.json"))
    assert [layer["file"] for layer in manifest["layers"]] == pngs
    for entry, name in zip(finished_classic_job["result"]["layers"], pngs):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(archive.read(name)))),
                              np.asarray(open_image(client.get(entry["url"]).content)))


def test_psd_has_one_named_pixel_layer_per_layer_in_order(client, finished_classic_job):
    response = client.get(finished_classic_job["result"]["psd_url"])
    assert response.status_code == 200
    psd = PSDImage.open(io.BytesIO(response.content))
    names = [entry["name"] for entry in finished_classic_job["result"]["layers"]]
    assert [layer.name for layer in psd] == names
    assert all(layer.kind == "pixel" for layer in psd)
    assert (psd.width, psd.height) == (320, 240)


def test_manifest_matches_the_job(client, finished_classic_job):
    manifest = client.get(finished_classic_job["result"]["manifest_url"]).json()
    result = finished_classic_job["result"]
    assert manifest["order"] == "bottom_to_top" and manifest["engine"] == "classic"
    assert manifest["canvas"] == {"width": 320, "height": 240}
    assert [(m["index"], m["name"], m["bbox"]) for m in manifest["layers"]] == \
        [(r["index"], r["name"], r["bbox"]) for r in result["layers"]]
    assert manifest["params"]["layers"] == 4 and "model_ms" in manifest["timings"]


def test_manifest_says_when_the_job_finished(client, finished_classic_job):
    finished_at = finished_classic_job["finished_at"]
    assert finished_at is not None
    assert client.get(finished_classic_job["result"]["manifest_url"]).json()["finished_at"] == finished_at
    archive = zipfile.ZipFile(io.BytesIO(client.get(finished_classic_job["result"]["zip_url"]).content))
    assert json.loads(archive.read("manifest.json"))["finished_at"] == finished_at


def test_a_flat_design_with_as_many_parts_as_layers_has_no_warning(client, design):
    response = submit(client, png_bytes(design[0]), headers={"Prefer": "wait=60"}, model="classic", layers=3)
    assert response.status_code == 200
    assert response.json()["warning"] is None


@pytest.fixture
def photo_job(client) -> dict:
    """A real photo decomposed into 4 layers by the classic engine: the finished job."""
    from skimage.data import astronaut  # a real photo, bundled with scikit-image

    response = submit(client, png_bytes(astronaut()), headers={"Prefer": "wait=60"}, model="classic", layers=4)
    assert response.status_code == 200
    return response.json()


def test_a_photo_through_the_classic_engine_succeeds_with_a_warning_that_it_found_fewer_layers(client, photo_job):
    assert photo_job["status"] == "succeeded"
    warning = photo_job["warning"]
    assert "only 1 of the 4 layers asked for have content" in warning and "flat graphics" in warning
    assert client.get(f"/v1/jobs/{photo_job['id']}").json()["warning"] == warning


def test_a_jobs_warning_is_kept_in_the_job_store_so_a_restarted_app_reads_it(photo_job, data_dir):
    with JobStore(JobsConfig(data_dir=str(data_dir)).url) as store:  # the app's store, opened afresh
        stored = store.get(photo_job["id"])
    assert job_json(stored)["warning"] == photo_job["warning"]


def test_tiny_qwen_job_streams_one_progress_event_per_step(client):
    data, _ = red_disc_png(64, 48)
    job = submit(client, data, **QWEN).json()
    events = list(sse_events(client, job["id"]))
    steps = [data["step"] for event, data in events if event == "progress"]
    assert steps == [1, 2, 3]
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded"
    finished = client.get(f"/v1/jobs/{job['id']}").json()
    assert finished["result"]["engine"] == "qwen-image-layered"
    for entry in finished["result"]["layers"]:
        assert open_image(client.get(entry["url"]).content).size == (64, 48)


def test_progress_events_say_when_the_model_finished_each_step(client):
    from datetime import datetime

    image, _ = flat_design(1024, 768)  # large enough that the stream sees steps run
    job = submit(client, png_bytes(image), model="classic", layers=3).json()
    received = []
    for event, data in sse_events(client, job["id"]):
        received.append((event, data, time.time()))
    progress = [(datetime.fromisoformat(data["at"]).timestamp(), at) for event, data, at in received
                if event == "progress"]
    assert progress, "no progress event arrived"
    finished = client.get(f"/v1/jobs/{job['id']}").json()
    started = datetime.fromisoformat(finished["started_at"]).timestamp()
    stamps = [stamp for stamp, _ in progress]
    assert stamps == sorted(stamps)
    # Stamped in the model replica after the job started, before this client received it
    # (the same machine's clock).
    assert all(started <= stamp <= receipt for stamp, receipt in progress)


def test_cancelling_a_running_job_ends_it_cancelled_within_one_step(client):
    data, _ = red_disc_png(64, 48)
    job = submit(client, data, **{**QWEN, "steps": 40}).json()
    events = sse_events(client, job["id"])
    cancelled_at = None
    seen = []
    for event, payload in events:
        seen.append((event, payload))
        if event == "progress" and cancelled_at is None:
            response = client.delete(f"/v1/jobs/{job['id']}")
            assert response.status_code == 202
            # Counted from the step the job had when the cancel was recorded: the model
            # may take more steps while this event and the request travel.
            cancelled_at = response.json()["step"]
    assert seen[-1][1]["status"] == "cancelled"
    steps = [payload["step"] for event, payload in seen if event == "progress"]
    assert max(steps) <= cancelled_at + 1
    assert client.get(f"/v1/jobs/{job['id']}/result.zip").status_code == 404


@pytest.fixture
def busy_dispatcher(client):
    """Two long tiny-qwen jobs hold both dispatch slots (max_running: 2), so
    further jobs stay queued until the fixture cancels them."""
    blockers = [submit(client, red_disc_png(64, 48)[0], **{**QWEN, "steps": 100}).json() for _ in range(2)]
    for blocker in blockers:
        deadline = time.monotonic() + 30
        while client.get(f"/v1/jobs/{blocker['id']}").json()["status"] != "running":
            assert time.monotonic() < deadline, "a blocker job did not start"
            time.sleep(0.1)

    def release():
        if not blockers:
            return
        for blocker in blockers:
            client.delete(f"/v1/jobs/{blocker['id']}")
        for blocker in blockers:
            assert wait_for_end(client, blocker["id"])["status"] == "cancelled"
        blockers.clear()

    yield release
    release()


def test_cancelling_a_queued_job_is_immediate(client, design, busy_dispatcher):
    queued = submit(client, png_bytes(design[0]), model="classic").json()
    assert queued["status"] == "queued"
    response = client.delete(f"/v1/jobs/{queued['id']}")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"


def test_a_job_row_without_its_parameters_fails_once_with_the_reason(client, data_dir):
    # A row no version of this API writes (by hand, or from an incompatible version).
    with JobStore(JobsConfig(data_dir=str(data_dir)).url) as store:  # the app's store
        job = store.create("layers", {"model": "classic"})
    ended = wait_for_end(client, job.id)
    assert ended["status"] == "failed" and ended["attempts"] == 1
    assert "lack layers, resolution, steps, seed, prompt, true_cfg_scale" in ended["error"]


def test_list_is_newest_first_filters_by_status_and_pages(client, design):
    data = png_bytes(design[0])
    ids = [submit(client, data, headers={"Prefer": "wait=60"}, model="classic", layers=2).json()["id"]
           for _ in range(3)]
    first = client.get("/v1/jobs", params={"limit": 2, "status": "succeeded"}).json()
    assert [job["id"] for job in first["jobs"]] == ids[::-1][:2]
    second = client.get("/v1/jobs", params={"limit": 2, "status": "succeeded",
                                             "cursor": first["next_cursor"]}).json()
    assert second["jobs"][0]["id"] == ids[0]
    assert all(job["status"] == "succeeded" for job in first["jobs"] + second["jobs"])


def test_deleting_a_finished_job_removes_it_and_its_files(client, finished_classic_job):
    job_id = finished_classic_job["id"]
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert_problem(client.get(f"/v1/jobs/{job_id}"), 404, job_id)
    assert client.get(f"/v1/jobs/{job_id}/layers/1.png").status_code == 404


def test_unknown_job_is_a_404_problem(client):
    assert_problem(client.get("/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA"), 404, "no job")


def test_a_malformed_job_id_is_the_404_of_an_unknown_job(client):
    for method, path in (("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/events"),
                         ("GET", "/v1/jobs/nope/layers/1.png"), ("GET", "/v1/jobs/nope/result.zip"),
                         ("GET", "/v1/jobs/nope/result.psd"), ("GET", "/v1/jobs/nope/result.pptx"),
                         ("GET", "/v1/jobs/nope/manifest.json"), ("DELETE", "/v1/jobs/nope")):
        assert_problem(client.request(method, path), 404, "there is no job nope")


def test_path_traversal_in_a_job_id_finds_nothing(client):
    for path in ("/v1/jobs/..%2F..%2Fetc%2Fpasswd", "/v1/jobs/%2E%2E/layers/1.png",
                 "/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA/layers/..%2Finput.png"):
        assert client.get(path).status_code == 404


def test_bad_layer_parameters_are_refused(client, design):
    data = png_bytes(design[0])
    assert_problem(submit(client, data, model="classic", layers=11), 422, "layers")
    assert_problem(submit(client, data, model="classic", resolution=800), 422, "640 or 1024")
    assert_problem(submit(client, data, model="nope"), 422, "classic", "tiny-qwen")
    assert_problem(submit(client, b"not an image"), 415)


def submit_50_at_once(client, data: bytes):
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda _: submit(client, data, model="classic", layers=2), range(50)))


def test_50_jobs_against_a_queue_bound_of_20_are_202_or_503_and_none_vanish(client, design, busy_dispatcher):
    responses = submit_50_at_once(client, png_bytes(design[0][:64, :64].copy()))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {202, 503}
    assert statuses.count(202) == 20  # nothing is dispatched while the slots are busy
    refused = [r for r in responses if r.status_code == 503]
    assert_problem(refused[0], 503, "queued")
    assert all(r.headers["retry-after"] == "1" for r in refused)
    busy_dispatcher()  # free the slots: every accepted job must now run
    accepted = [r.json()["id"] for r in responses if r.status_code == 202]
    assert [wait_for_end(client, job_id)["status"] for job_id in accepted] == ["succeeded"] * 20


def test_a_job_failed_by_a_call_between_deployments_says_why_in_one_line():
    # Deployments call each other over gRPC (serve_app.run.FAST_PATH_ENV); such a
    # failure's str() is a multi-line repr whose last line is ">". Built here from
    # grpc's own class: the message-size refusal cannot be provoked at a 1 GiB limit.
    from grpc import StatusCode
    from grpc.aio import AioRpcError, Metadata

    from serve_app.layer_jobs import _readable_error

    error = AioRpcError(StatusCode.RESOURCE_EXHAUSTED, Metadata(), Metadata(),
                        details="Received message larger than max (5000000 vs. 4194304)")
    assert _readable_error(error) == "RESOURCE_EXHAUSTED: Received message larger than max (5000000 vs. 4194304)"
