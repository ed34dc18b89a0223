"""Result files are reached only through the job API: path traversal on every
result route and through /static finds nothing, over real HTTP (raw request
lines: http.client sends paths as written, unlike httpx, which normalises them).

A canary file sits in the data directory beside the jobs, and each finished job
keeps its input under its own folder; no crafted path may return either, nor any
file of the machine or the repository."""

from __future__ import annotations

import http.client
import os
import secrets
from urllib.parse import urlsplit

import httpx
import pytest

from serve_app.jobs import new_job_id
from serve_app.routes.web import FRONTEND_DIR
from tests.conftest import ROOT, deploy_config, tiny_config
from tests.test_layer_jobs_api import submit
from tests.test_remove_background_api import red_disc_png

# Deploys configs of its own: runs after the modules that share the default app (conftest).
pytestmark = pytest.mark.own_deployment

CANARY = f"canary-{secrets.token_hex(16)}".encode()
IMAGE, _ = red_disc_png(160, 120)

# Ways to write "go up and elsewhere" in a URL path segment.
TRAVERSALS = [
    "../../canary.txt", "..%2f..%2fcanary.txt", "%2e%2e%2f%2e%2e%2fcanary.txt", "%2e%2e/%2e%2e/canary.txt",
    "..%252f..%252fcanary.txt", "..\\..\\canary.txt", "..%5c..%5ccanary.txt", "....//....//canary.txt",
    "%2fetc%2fpasswd", "/etc/passwd", "\\etc\\passwd", "C:%5cWindows%5cwin.ini", "canary.txt%00",
    "%00", "..%00/canary.txt", "%c0%ae%c0%ae%2fcanary.txt", "..;/canary.txt", ".", "..",
]


@pytest.fixture(scope="module")
def finished_job(serve_instance, tiny_models_dir, data_dir) -> str:
    """A finished job of the open test config, with canaries beside the job folders."""
    (data_dir / "canary.txt").write_bytes(CANARY)
    (data_dir / "jobs" / "canary.txt").parent.mkdir(parents=True, exist_ok=True)
    (data_dir / "jobs" / "canary.txt").write_bytes(CANARY)
    deploy_config(tiny_config(tiny_models_dir, data_dir))
    with httpx.Client(base_url=serve_instance, timeout=60) as client:
        response = submit(client, IMAGE, headers={"Prefer": "wait=60"}, model="classic", layers=2)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written in the request line."""
    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_finds_nothing(status: int, body: bytes, path: str) -> None:
    assert 400 <= status < 500, f"{path}: {status}"
    assert CANARY not in body and b"root:" not in body and b"\x89PNG" not in body, path


def attempts(job_id: str) -> list[str]:
    """Every result route with each traversal in each place a client controls."""
    paths = []
    for attack in TRAVERSALS:
        for route in ("/v1/jobs/{x}", "/v1/jobs/{x}/events", "/v1/jobs/{x}/layers/1.png", "/v1/jobs/{x}/result.zip",
                      "/v1/jobs/{x}/result.psd", "/v1/jobs/{x}/manifest.json"):
            paths.append(route.format(x=attack))
            paths.append(route.format(x=f"{job_id}/{attack}"))
        paths.append(f"/v1/jobs/{job_id}/layers/{attack}")
        paths.append(f"/v1/jobs/{job_id}/layers/{attack}.png")
    return paths


def test_traversal_on_every_result_route_finds_nothing(strata, finished_job):
    tried = attempts(finished_job)
    for path in tried:
        assert_finds_nothing(*raw_get(strata, path), path)
    assert len(tried) >= 200


def test_files_in_a_jobs_folder_are_not_reachable_by_name(strata, finished_job):
    for name in ("input.png", "layer_01.png", "result.json", "../canary.txt"):
        status, body = raw_get(strata, f"/v1/jobs/{finished_job}/{name}")
        assert status == 404 or status == 422, name


@pytest.mark.parametrize("path", [
    "/data/jobs.db", "/jobs/{job}/input.png", "/data/jobs/{job}/layer_01.png",
    "/static/../data/canary.txt", "/static/..%2f..%2fdata%2fcanary.txt", "/static/%2e%2e/serve_app/config.py",
    "/static/{to_data}/canary.txt", "/static/{to_data}/jobs/{job}/input.png", "/static/%00",
    "/static//etc/passwd", "/static/..\\..\\serve_app\\config.py",
])
def test_result_files_are_not_served_outside_the_api(strata, finished_job, data_dir, path):
    to_data = os.path.relpath(data_dir, FRONTEND_DIR)
    path = path.format(job=finished_job, to_data=to_data)
    status, body = raw_get(strata, path)
    assert_finds_nothing(status, body, path)
    assert b"BaseModel" not in body  # no repository source either
    assert (ROOT / "serve_app" / "config.py").exists()


def test_job_ids_are_128_random_bits_url_safe():
    ids = {new_job_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(job_id) == 22 and set(job_id) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                         "0123456789-_") for job_id in ids)
    # Every character position varies: nothing fixed or sequential to guess from.
    assert all(len({job_id[i] for job_id in ids}) > 32 for i in range(21))


def test_without_cors_config_no_origin_is_allowed(client):
    response = client.options("/v1/remove-background", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in response.headers
    response = client.get("/v1/jobs", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
