"""LocalStorage: job inputs and results on disk, by key."""

from __future__ import annotations

import os

import pytest

from serve_app.storage import LocalStorage, Storage


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "data")


def _files_under(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(folder, name), root)
        for folder, _dirs, names in os.walk(root)
        for name in names
    )


def test_put_then_get_returns_the_bytes(storage):
    storage.put("jobs/abc/input.png", b"\x89PNG data")
    assert storage.get("jobs/abc/input.png") == b"\x89PNG data"


def test_put_replaces_the_content_and_leaves_no_temporary_files(storage):
    storage.put("jobs/abc/layer_01.png", b"old")
    storage.put("jobs/abc/layer_01.png", b"new")
    assert storage.get("jobs/abc/layer_01.png") == b"new"
    assert _files_under(storage.root) == ["jobs/abc/layer_01.png"]


def test_failed_write_keeps_the_old_content(storage):
    storage.put("jobs/abc/result.zip", b"complete")
    with pytest.raises(TypeError):
        storage.put("jobs/abc/result.zip", "not bytes")  # fails while writing
    assert storage.get("jobs/abc/result.zip") == b"complete"
    assert _files_under(storage.root) == ["jobs/abc/result.zip"]


def test_path_points_at_the_stored_file(storage):
    storage.put("jobs/abc/layer_02.png", b"x")
    path = storage.path("jobs/abc/layer_02.png")
    assert path == storage.root / "jobs" / "abc" / "layer_02.png"
    assert path.read_bytes() == b"x"


def test_exists_tells_stored_keys_from_missing_ones(storage):
    storage.put("jobs/abc/input.png", b"x")
    assert storage.exists("jobs/abc/input.png")
    assert not storage.exists("jobs/abc/missing.png")
    assert not storage.exists("jobs/abc")  # a folder is not a stored file


def test_get_of_a_missing_key_raises_file_not_found(storage):
    with pytest.raises(FileNotFoundError):
        storage.get("jobs/nope/input.png")


@pytest.mark.parametrize(
    "key",
    [
        "../outside.png",
        "jobs/../../outside.png",
        "jobs/abc/../../../outside.png",
        "/etc/passwd",
        "",
        "/",
        "jobs//abc",
        ".hidden",
        "jobs/./abc",
        "jobs\\..\\outside.png",
        "C:/outside.png",
        "jobs/abc\x00.png",
    ],
)
def test_storage_refuses_keys_outside_root(storage, key):
    for call in (
        lambda: storage.put(key, b"x"),
        lambda: storage.get(key),
        lambda: storage.path(key),
        lambda: storage.exists(key),
        lambda: storage.delete_prefix(key),
    ):
        with pytest.raises(ValueError):
            call()
    assert not (storage.root.parent / "outside.png").exists()


def test_storage_refuses_a_symlink_leading_outside_root(storage, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (storage.root / "jobs").mkdir()
    (storage.root / "jobs" / "link").symlink_to(outside)
    with pytest.raises(ValueError):
        storage.put("jobs/link/input.png", b"x")
    assert list(outside.iterdir()) == []


def test_delete_prefix_removes_a_jobs_folder_and_nothing_else(storage):
    storage.put("jobs/ab/input.png", b"1")
    storage.put("jobs/ab/layer_01.png", b"2")
    storage.put("jobs/abc/input.png", b"3")
    assert storage.delete_prefix("jobs/ab") is True
    assert not storage.exists("jobs/ab/input.png")
    assert not storage.path("jobs/ab").exists()
    assert storage.get("jobs/abc/input.png") == b"3"


def test_delete_prefix_of_nothing_reports_false(storage):
    assert storage.delete_prefix("jobs/never/") is False


def test_local_storage_satisfies_the_storage_interface(storage):
    assert isinstance(storage, Storage)
