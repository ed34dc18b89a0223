"""deployments/weights.py: devices, dtypes, and every way of (not) getting weights.

The Hugging Face hub is never reached here: hub ids meet either HF_HUB_OFFLINE, a
closed local port as HF_ENDPOINT, or a mocked huggingface_hub.snapshot_download.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import huggingface_hub
from deployments.weights import (
    WeightsUnavailable,
    load_pretrained,
    resolve_device,
    resolve_dtype,
    resolve_source,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF_HOME in tmp, online mode, a hub that refuses connections."""
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    # No token from a developer's ~/.cache/huggingface/token either.
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    return home


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_cached_snapshot(hf_home: Path, repo_id: str, files: dict[str, str]) -> Path:
    """The layout huggingface_hub's cache has after a download of ``repo_id``@main."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def _http_error(cls, status: int, url: str):
    try:
        import httpx2 as httpx  # what huggingface_hub 2.x builds its errors from
    except ImportError:  # pragma: no cover - older huggingface_hub
        import httpx
    response = httpx.Response(status, request=httpx.Request("GET", url))
    return cls(f"{status} Client Error for url: {url}", response=response)


def _mock_hub(monkeypatch, online_error: Exception | None = None, online_path: str | None = None):
    """snapshot_download: nothing cached; online it raises ``online_error`` or returns a path."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake_snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        calls.append({"repo_id": repo_id, "local_files_only": local_files_only, **kwargs})
        if local_files_only:
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
        if online_error is not None:
            raise online_error
        return online_path

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return calls


# ----------------------------------------------------------------- device and dtype


def test_resolve_device_auto_is_cpu_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"


def test_resolve_device_auto_is_cuda_when_available(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


def test_resolve_device_returns_explicit_setting():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"


def test_resolve_device_rejects_nonsense():
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu-please")


def test_resolve_dtype_auto_on_cpu_is_float32():
    import torch

    assert resolve_dtype("auto", "cpu") == torch.float32


def test_resolve_dtype_half_on_cpu_falls_back_to_float32_with_a_log_line(caplog):
    import torch

    with caplog.at_level(logging.WARNING, logger="deployments.weights"):
        assert resolve_dtype("float16", "cpu") == torch.float32
        assert resolve_dtype("bfloat16", "cpu") == torch.float32
    assert "float32" in caplog.text and "CPU" in caplog.text


def test_resolve_dtype_explicit_names_are_honoured_on_gpu():
    import torch

    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("float16", "cuda") == torch.float16
    assert resolve_dtype("bf16", "cuda:1") == torch.bfloat16


def test_resolve_dtype_auto_on_cuda_is_bfloat16_on_ampere_and_float16_before(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_dtype("auto", "cuda") == torch.float16


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", "cpu")


# ----------------------------------------------------------------- local directories


def test_local_directory_is_passed_to_the_loader_with_kwargs(tmp_path):
    seen = {}

    def loader(path, **kwargs):
        seen.update(path=path, **kwargs)
        return "model"

    assert load_pretrained(loader, str(tmp_path), trust_remote_code=True) == "model"
    assert seen == {"path": str(tmp_path), "trust_remote_code": True}


def test_missing_local_directory_raises_with_its_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(WeightsUnavailable) as info:
        load_pretrained(lambda path: path, str(missing))
    assert info.value.reason == f"local directory {missing} does not exist"
    assert str(info.value) == info.value.reason


def test_a_file_instead_of_a_directory_is_refused(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(WeightsUnavailable, match="not a model directory"):
        resolve_source(str(file))


def test_a_name_that_is_neither_directory_nor_hub_id_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsUnavailable, match="neither a local directory nor a Hugging Face"):
        resolve_source("birefnet")


def test_loader_oserror_on_a_local_directory_becomes_weights_unavailable(tmp_path):
    def loader(path):
        raise OSError(f"{path} does not appear to have a file named config.json.")

    with pytest.raises(WeightsUnavailable) as info:
        load_pretrained(loader, str(tmp_path))
    assert str(tmp_path) in info.value.reason and "config.json" in info.value.reason


def test_loader_import_error_says_what_to_install(tmp_path):
    def loader(path):
        raise ImportError("This modeling file requires timm, kornia. Run `pip install timm kornia`")

    with pytest.raises(WeightsUnavailable) as info:
        load_pretrained(loader, str(tmp_path), pip_hint="pip install 'strata[gpu]'")
    assert "timm" in info.value.reason and "strata[gpu]" in info.value.reason


# ----------------------------------------------------------------- hub ids


def test_hub_id_offline_with_empty_cache_fails_fast_and_names_the_model(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable) as info:
        load_pretrained(lambda path: path, "ZhengPeng7/BiRefNet")
    assert time.monotonic() - start < 15  # no retry-with-backoff (~25 s)
    reason = info.value.reason
    assert "ZhengPeng7/BiRefNet" in reason and "HF_HUB_OFFLINE" in reason
    assert str(hf_home) in reason and "hf download" in reason


def test_hub_id_with_unreachable_hub_fails_fast_and_names_the_model(hf_home):
    # Online mode, but HF_ENDPOINT is a closed local port: the real huggingface_hub code
    # path for "no network", deterministic wherever the tests run.
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable) as info:
        load_pretrained(lambda path: path, "ZhengPeng7/BiRefNet")
    assert time.monotonic() - start < 15  # no retry-with-backoff (~25 s)
    assert info.value.reason.startswith("ZhengPeng7/BiRefNet is not in the Hugging Face cache")
    assert "hub cannot be reached" in info.value.reason


def test_cached_snapshot_is_used_without_asking_the_hub(hf_home, monkeypatch):
    snapshot = _fake_cached_snapshot(hf_home, "org/model", {"config.json": "{}"})
    real = huggingface_hub.snapshot_download
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert load_pretrained(lambda path: path, "org/model") == str(snapshot)
    assert calls == [True]


def test_cached_snapshot_is_used_offline(hf_home, monkeypatch):
    snapshot = _fake_cached_snapshot(hf_home, "org/model", {"config.json": "{}"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_source("org/model")
    assert (resolved.path, resolved.origin) == (str(snapshot), "cache")


def test_partial_cached_snapshot_is_completed_from_the_hub(hf_home, monkeypatch, tmp_path):
    cached = _fake_cached_snapshot(hf_home, "org/model", {"config.json": "{}"})
    complete = tmp_path / "complete"
    complete.mkdir()
    real = huggingface_hub.snapshot_download

    def fake(repo_id, *, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kwargs)
        return str(complete)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)

    def loader(path):
        if path == str(cached):
            raise OSError("no file named model.safetensors")
        return path

    assert load_pretrained(loader, "org/model") == str(complete)


def test_gated_repo_without_token_says_accept_terms_and_set_hf_token(hf_home, monkeypatch):
    # We cannot reach the hub, so huggingface_hub is mocked to raise what it raises for a
    # gated repo (HTTP 401 with X-Error-Code: GatedRepo) when no token is sent.
    from huggingface_hub.errors import GatedRepoError

    error = _http_error(GatedRepoError, 401, "https://huggingface.co/api/models/briaai/RMBG-2.0")
    _mock_hub(monkeypatch, online_error=error)
    with pytest.raises(WeightsUnavailable) as info:
        load_pretrained(lambda path: path, "briaai/RMBG-2.0")
    assert info.value.reason.startswith(
        "briaai/RMBG-2.0 is gated: accept its terms on huggingface.co")
    assert "HF_TOKEN" in info.value.reason
    assert info.value.__cause__ is error


def test_gated_repo_with_token_says_the_token_lacks_access(hf_home, monkeypatch):
    # Mocked as above: the hub answers 403 GatedRepo to a token whose account has not
    # accepted the terms.
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    error = _http_error(GatedRepoError, 403, "https://huggingface.co/api/models/briaai/RMBG-2.0")
    _mock_hub(monkeypatch, online_error=error)
    with pytest.raises(WeightsUnavailable, match="token in HF_TOKEN has no access"):
        load_pretrained(lambda path: path, "briaai/RMBG-2.0")


def test_unknown_repository_says_check_the_id(hf_home, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    error = _http_error(RepositoryNotFoundError, 404, "https://huggingface.co/api/models/org/nope")
    _mock_hub(monkeypatch, online_error=error)
    with pytest.raises(WeightsUnavailable) as info:
        load_pretrained(lambda path: path, "org/nope")
    assert "org/nope was not found" in info.value.reason and "HF_TOKEN" in info.value.reason


def test_download_honours_revision_and_patterns(hf_home, monkeypatch, tmp_path):
    calls = _mock_hub(monkeypatch, online_path=str(tmp_path))
    load_pretrained(lambda path: path, "org/model", revision="v2", ignore_patterns=["*.onnx"])
    online = [c for c in calls if not c["local_files_only"]]
    assert len(online) == 1
    assert online[0]["revision"] == "v2" and online[0]["ignore_patterns"] == ["*.onnx"]
    assert online[0]["cache_dir"] == str(hf_home / "hub")


# ----------------------------------------------------------------- import weight


def test_importing_weights_does_not_import_torch():
    code = ("import sys, deployments.weights; "
            "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
