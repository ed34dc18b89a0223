"""image-layer-saas's API answered by Strata's layer jobs, over real HTTP on a real local Ray.

Requests are made as image-layer-saas's README and frontend (frontend/app.js)
make them: `POST /api/decompose` with a multipart `image` and `num_layers`
(`curl -H "X-Async-Only: true" -F image=@image.png -F num_layers=4`), then
`status_url`, `layer_urls` and `download_url`. configs/test.yaml's default
layer model is the weights-free `classic` palette engine.
"""

from __future__ import annotations

import io
import time
import zipfile
from datetime import datetime, timezone

import numpy as np
import pytest

from serve_app.jobs import Job, JobStatus
from serve_app.routes.layer_saas_compat import status_body
from tests.images import flat_design
from tests.test_layer_jobs_api import busy_dispatcher, psnr, stack  # noqa: F401 - busy_dispatcher is a fixture
from tests.test_remove_background_api import open_image, png_bytes

ASYNC = {"X-Async-Only": "true"}


@pytest.fixture(scope="module")
def design_png() -> bytes:
    rgb, _ = flat_design(320, 240, seed=3)
    return png_bytes(rgb)


def decompose(client, data: bytes, headers=None, filename="design.png", **fields):
    return client.post("/api/decompose", headers=headers or {}, files={"image": (filename, data, "image/png")},
                       data={name: str(value) for name, value in fields.items()})


def poll(client, status_url: str, timeout_s: float = 120) -> dict:
    """The task's status once it is done or failed (polling a condition, bounded), as the frontend polls."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(status_url).json()
        if body["status"] in ("done", "error"):
            return body
        time.sleep(0.2)
    pytest.fail(f"{status_url} did not finish within {timeout_s} s")


def assert_detail(response, status: int, detail: str | None = None):
    """An error in image-layer-saas's (FastAPI's) shape: {"detail": "..."}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    if detail is not None:
        assert response.json()["detail"] == detail


def test_async_only_answers_202_with_the_task_and_absolute_urls(client, design_png):
    response = decompose(client, design_png, headers=ASYNC, num_layers=4)
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"task_id", "status", "status_url", "download_url"}
    assert body["status"] == "processing"
    base = str(client.base_url).rstrip("/")
    assert body["status_url"] == f"{base}/api/status/{body['task_id']}"
    assert body["download_url"] == f"{base}/api/download/{body['task_id']}"


def test_a_finished_task_lists_its_layers_and_their_urls(client, design_png):
    task = decompose(client, design_png, headers=ASYNC, num_layers=4).json()
    done = poll(client, task["status_url"])
    assert done["status"] == "done" and done["progress"] == 100
    assert done["layers"] == ["layer_01.png", "layer_02.png", "layer_03.png", "layer_04.png"]
    assert done["download_url"] == task["download_url"]
    layers = []
    for url in done["layer_urls"]:
        response = client.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = open_image(response.content)
        assert image.mode == "RGBA" and image.size == (320, 240)
        layers.append(np.asarray(image))
    # Background first: stacked back to front they give the picture back.
    assert psnr(stack(layers), np.asarray(open_image(design_png).convert("RGB"))) >= 40


def test_download_url_is_the_zip_of_the_layers(client, design_png):
    task = decompose(client, design_png, headers=ASYNC, num_layers=3).json()
    poll(client, task["status_url"])
    response = client.get(task["download_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert f'filename="{task["task_id"]}_layers.zip"' in response.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = archive.namelist()
        assert [name for name in names if name.endswith(".png")] == ["layer_01.png", "layer_02.png", "layer_03.png"]
        assert open_image(archive.read("layer_01.png")).size == (320, 240)


def test_without_async_only_the_zip_comes_back_when_the_task_ends_in_time(client, design_png):
    response = decompose(client, design_png, filename="poster.png", num_layers=2)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert 'filename="poster_layers.zip"' in response.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert {"layer_01.png", "layer_02.png"} <= set(archive.namelist())


def test_the_frontends_preset_fields_become_the_jobs_steps_and_guidance(client, design_png):
    task = decompose(client, design_png, headers=ASYNC, num_layers=3, inference_preset="quality",
                     resolution=640, num_inference_steps=32, true_cfg_scale=3.5, use_en_prompt="true",
                     cfg_normalize="true").json()
    params = client.get(f"/v1/jobs/{task['task_id']}").json()["params"]
    assert (params["layers"], params["steps"], params["true_cfg_scale"], params["resolution"]) == (3, 32, 3.5, 640)
    safe = decompose(client, design_png, headers=ASYNC, inference_preset="safe").json()
    params = client.get(f"/v1/jobs/{safe['task_id']}").json()["params"]
    assert (params["layers"], params["steps"], params["true_cfg_scale"]) == (4, 16, 2.5)


def test_a_custom_resolution_runs_at_the_nearest_bucket(client, design_png):
    task = decompose(client, design_png, headers=ASYNC, inference_preset="custom", resolution=1024,
                     num_inference_steps=12, true_cfg_scale=2.0).json()
    params = client.get(f"/v1/jobs/{task['task_id']}").json()["params"]
    assert (params["resolution"], params["steps"], params["true_cfg_scale"]) == (1024, 12, 2.0)


def test_a_queued_task_is_pending(client, design_png, busy_dispatcher):  # noqa: F811
    task = decompose(client, design_png, headers=ASYNC).json()
    body = client.get(task["status_url"]).json()
    assert body["status"] == "pending" and body["progress"] == 0 and body["state"] == "PENDING"
    assert body["events"] and "layer_urls" not in body
    busy_dispatcher()
    assert poll(client, task["status_url"])["status"] == "done"


def test_num_layers_outside_2_to_8_is_422(client, design_png):
    for count in (1, 9):
        assert_detail(decompose(client, design_png, num_layers=count), 422, "num_layers must be between 2 and 8")


def test_an_unknown_preset_is_422(client, design_png):
    assert_detail(decompose(client, design_png, inference_preset="turbo"), 422,
                  "inference_preset must be one of: safe, balanced, quality, custom")


def test_a_field_of_the_wrong_type_is_422_in_fastapis_shape(client, design_png):
    response = decompose(client, design_png, num_layers="four")
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "num_layers"]


def test_a_request_without_the_image_field_is_422_naming_it(client, design_png):
    response = client.post("/api/decompose", files={"file": ("design.png", design_png, "image/png")})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "image"]


def test_a_file_that_is_not_an_image_is_400(client):
    assert_detail(decompose(client, b"GIF89a" + bytes(64), filename="x.gif"), 400)


def test_an_unknown_task_is_404(client):
    assert_detail(client.get("/api/status/no-such-task-0123456789"), 404)
    assert_detail(client.get("/api/download/no-such-task-0123456789"), 404, "Result ZIP is not available for this task")


def test_layer_names_must_be_png_file_names_of_the_task(client, design_png):
    task = decompose(client, design_png, headers=ASYNC, num_layers=2).json()
    poll(client, task["status_url"])
    base = f"/api/layer/{task['task_id']}"
    assert client.get(f"{base}/layer_02.png").status_code == 200
    assert_detail(client.get(f"{base}/layer_01.jpg"), 400, "Invalid layer file name")
    assert_detail(client.get(f"{base}/layer_03.png"), 404, "Layer file not found")
    assert_detail(client.get(f"{base}/manifest.png"), 404, "Layer file not found")


def test_health_names_the_model_and_the_gpu(client):
    body = client.get("/api/health").json()
    assert body["status"] in ("ok", "degraded")
    assert body["model"]["id"] == "classic"
    assert body["model"]["device"] == "cpu" and body["model"]["loaded"] is True
    assert {"dtype"} <= set(body["model"])
    # The test machine has no GPU: image-layer-saas's own answer for that case.
    assert body["gpu"] == {"available": False, "name": None, "vram_used_mb": 0, "vram_total_mb": 0}


# -- the status mapping for states a fast classic job passes too quickly to catch over HTTP


def job(status: JobStatus, **fields) -> Job:
    now = datetime.now(timezone.utc)
    values = dict(id="t" * 22, kind="layers", status=status, progress=0.0, step=None, total_steps=None,
                  created_at=now, started_at=now, finished_at=None, params={}, error=None, result=None,
                  attempts=1, cancel_requested=False, lease_owner=None, lease_expires_at=None, owner=None)
    return Job(**{**values, **fields})


def test_a_running_task_is_processing_with_a_whole_percent():
    body = status_body(job(JobStatus.RUNNING, progress=0.376, step=19, total_steps=50), request=None)
    assert (body["status"], body["progress"], body["state"]) == ("processing", 37, "PROGRESS")
    assert body["message"] == "Step 19/50" and "Step 19/50" in body["events"]


def test_a_failed_task_is_an_error_with_its_reason():
    body = status_body(job(JobStatus.FAILED, error="CUDA out of memory", finished_at=datetime.now(timezone.utc)),
                       request=None)
    assert (body["status"], body["error"], body["state"]) == ("error", "CUDA out of memory", "FAILURE")
    cancelled = status_body(job(JobStatus.CANCELLED, finished_at=datetime.now(timezone.utc)), request=None)
    assert (cancelled["status"], cancelled["state"]) == ("error", "REVOKED")


def test_health_reports_a_gpu_replicas_memory_in_mebibytes():
    # No GPU here: the replica's report is built as a GPU replica writes it
    # (deployments/loading.py health_report).
    from serve_app.routes.layer_saas_compat import gpu_report
    from serve_app.schemas import ModelHealth

    gib = 1024**3
    report = ModelHealth(loaded=True, gpu_name="NVIDIA H100 80GB HBM3",
                         gpu_memory={"allocated_bytes": 30 * gib, "free_bytes": 40 * gib, "total_bytes": 80 * gib})
    assert gpu_report([ModelHealth(loaded=True), report]) == {
        "available": True, "name": "NVIDIA H100 80GB HBM3", "vram_used_mb": 40 * 1024.0, "vram_total_mb": 80 * 1024.0}
