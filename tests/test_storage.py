"""Storage: job inputs and results by key. Every store behaves the same (LocalStorage
on disk; FsspecStorage, run for real on fsspec's in-memory filesystem, which is what
an object store looks like, and on file://); LocalStorage adds files written
atomically under its root."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest

from serve_app.storage import FsspecStorage, LocalStorage, Storage


@pytest.fixture(params=["local", "fsspec-memory", "fsspec-file"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        yield LocalStorage(tmp_path / "data")
    elif request.param == "fsspec-file":
        yield FsspecStorage(f"file://{tmp_path}/results")
    else:
        # fsspec's memory filesystem is one store per process: a fresh root per test.
        root = f"memory://strata-test-{uuid.uuid4().hex}/results"
        yield FsspecStorage(root)
        fs, path = fsspec.core.url_to_fs(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)


@pytest.fixture
def local(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "data")


def _files_under(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(folder, name), root)
        for folder, _dirs, names in os.walk(root)
        for name in names
    )


# -- every store ------------------------------------------------------------------


def test_it_is_a_storage(storage):
    assert isinstance(storage, Storage)


def test_put_then_get_returns_the_bytes(storage):
    storage.put("jobs/abc/input.png", b"\x89PNG data")
    assert storage.get("jobs/abc/input.png") == b"\x89PNG data"


def test_put_replaces_the_content(storage):
    storage.put("jobs/abc/layer_01.png", b"old")
    storage.put("jobs/abc/layer_01.png", b"new")
    assert storage.get("jobs/abc/layer_01.png") == b"new"


def test_data_that_is_not_bytes_is_refused_and_the_old_content_kept(storage):
    storage.put("jobs/abc/result.zip", b"complete")
    with pytest.raises(TypeError):
        storage.put("jobs/abc/result.zip", "not bytes")
    assert storage.get("jobs/abc/result.zip") == b"complete"


def test_exists_tells_stored_keys_from_missing_ones(storage):
    storage.put("jobs/abc/input.png", b"x")
    assert storage.exists("jobs/abc/input.png")
    assert not storage.exists("jobs/abc/missing.png")
    assert not storage.exists("jobs/abc")  # a folder is not a stored file


def test_get_of_a_missing_key_raises_file_not_found(storage):
    with pytest.raises(FileNotFoundError):
        storage.get("jobs/nope/input.png")


def test_delete_prefix_removes_a_jobs_files_and_only_those(storage):
    storage.put("jobs/ab/input.png", b"1")
    storage.put("jobs/ab/layer_01.png", b"2")
    storage.put("jobs/abc/input.png", b"3")  # same leading letters, another job
    assert storage.delete_prefix("jobs/ab") is True
    assert not storage.exists("jobs/ab/input.png")
    assert not storage.exists("jobs/ab/layer_01.png")
    assert storage.get("jobs/abc/input.png") == b"3"


def test_delete_prefix_of_nothing_says_so(storage):
    assert storage.delete_prefix("jobs/never/") is False


UNSAFE_KEYS = ["../outside.png", "jobs/../../outside.png", "jobs/abc/../../../outside.png", "/etc/passwd", "",
               "/", "jobs//abc", ".hidden", "jobs/./abc", "jobs\\..\\outside.png", "C:/outside.png",
               "jobs/abc\x00.png", "s3://other-bucket/x"]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused(storage, key):
    for call in (lambda: storage.put(key, b"x"), lambda: storage.get(key), lambda: storage.exists(key),
                 lambda: storage.delete_prefix(key)):
        with pytest.raises(ValueError):
            call()


# -- LocalStorage: files on disk ----------------------------------------------------


def test_local_replacing_leaves_no_temporary_files(local):
    local.put("jobs/abc/layer_01.png", b"old")
    local.put("jobs/abc/layer_01.png", b"new")
    assert _files_under(local.root) == ["jobs/abc/layer_01.png"]


def test_local_failed_write_leaves_only_the_old_file(local):
    local.put("jobs/abc/result.zip", b"complete")
    with pytest.raises(TypeError):
        local.put("jobs/abc/result.zip", "not bytes")  # fails while writing
    assert _files_under(local.root) == ["jobs/abc/result.zip"]


def test_local_path_points_at_the_stored_file(local):
    local.put("jobs/abc/layer_02.png", b"x")
    path = local.path("jobs/abc/layer_02.png")
    assert path == local.root / "jobs" / "abc" / "layer_02.png"
    assert path.read_bytes() == b"x"


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_local_path_refuses_unsafe_keys_and_nothing_lands_outside(local, key):
    with pytest.raises(ValueError):
        local.path(key)
    with pytest.raises(ValueError):
        local.put(key, b"x")
    assert not (local.root.parent / "outside.png").exists()


def test_local_refuses_a_symlink_leading_outside_root(local, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (local.root / "jobs").mkdir()
    (local.root / "jobs" / "link").symlink_to(outside)
    with pytest.raises(ValueError):
        local.put("jobs/link/input.png", b"x")
    assert list(outside.iterdir()) == []


def test_local_delete_prefix_removes_the_jobs_folder(local):
    local.put("jobs/ab/input.png", b"1")
    assert local.delete_prefix("jobs/ab") is True
    assert not local.path("jobs/ab").exists()
