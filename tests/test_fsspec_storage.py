"""FsspecStorage beyond what every store does (tests/test_storage.py): one results_url
shared by instances, and open_storage: the store `jobs.results_url` names.

Run for real on fsspec's in-memory filesystem (what an object store looks like:
no directories, whole-object writes) and on file:// (real files)."""

from __future__ import annotations

import importlib.util
import uuid

import fsspec
import pytest

from serve_app.config import JobsConfig
from serve_app.storage import FsspecStorage, LocalStorage, open_storage


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path) -> str:
    if request.param == "memory":
        # fsspec's memory filesystem is one store per process: a fresh root per test.
        root = f"memory://strata-test-{uuid.uuid4().hex}/results"
        yield root
        fs, path = fsspec.core.url_to_fs(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        yield f"file://{tmp_path}/results"


def test_another_instance_on_the_same_url_sees_the_files(url):
    # What ingress replicas on different nodes do with one shared results_url.
    FsspecStorage(url).put("jobs/abc/manifest.json", b"{}")
    assert FsspecStorage(url).get("jobs/abc/manifest.json") == b"{}"


def test_get_of_a_folder_raises_file_not_found(url):
    storage = FsspecStorage(url)
    storage.put("jobs/abc/input.png", b"x")
    with pytest.raises(FileNotFoundError):
        storage.get("jobs/abc")


def test_file_urls_write_real_files_under_the_directory(tmp_path):
    storage = FsspecStorage(f"file://{tmp_path}/shared")
    storage.put("jobs/abc/layer_01.png", b"pixels")
    assert (tmp_path / "shared" / "jobs" / "abc" / "layer_01.png").read_bytes() == b"pixels"


# --------------------------------------------------------------------------- open_storage


def test_without_results_url_results_go_to_the_data_dir(tmp_path):
    storage = open_storage(JobsConfig(data_dir=str(tmp_path / "data")))
    assert isinstance(storage, LocalStorage)
    storage.put("jobs/abc/input.png", b"x")
    assert (tmp_path / "data" / "jobs" / "abc" / "input.png").read_bytes() == b"x"


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_a_local_results_url_opens_local_storage_there(tmp_path, form):
    target = tmp_path / "shared"
    results_url = str(target) if form == "path" else f"file://{target}"
    storage = open_storage(JobsConfig(data_dir=str(tmp_path / "data"), results_url=results_url))
    assert isinstance(storage, LocalStorage)  # atomic renames on a shared file system, and .path
    storage.put("jobs/abc/input.png", b"x")
    assert (target / "jobs" / "abc" / "input.png").read_bytes() == b"x"


def test_an_object_store_url_opens_fsspec_storage():
    url = f"memory://strata-test-{uuid.uuid4().hex}"
    storage = open_storage(JobsConfig(results_url=url))
    assert isinstance(storage, FsspecStorage)
    storage.put("jobs/abc/input.png", b"x")
    assert FsspecStorage(url).get("jobs/abc/input.png") == b"x"
    storage.delete_prefix("jobs")


def test_an_unknown_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be opened: Protocol not known: nosuchfs"):
        open_storage(JobsConfig(results_url="nosuchfs://bucket/strata"))


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_s3_without_s3fs_says_which_extra_to_install():
    with pytest.raises(ValueError, match=r"s3fs.*pip install 'strata\[cloud\]'"):
        open_storage(JobsConfig(results_url="s3://bucket/strata"))
