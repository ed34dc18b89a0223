"""scripts/fetch_models.py: which configured models are in the Hugging Face cache,
how big they are, and a clear word when a gated model needs a token.

No model can be downloaded here. `--check` runs for real against a temporary
HF_HOME laid out as huggingface_hub lays out a download, holding the tiny BiRefNet
of scripts/make_tiny_models.py. The gated-model case runs the real
huggingface_hub download code against a local stand-in for the hub's HTTP API
(HF_ENDPOINT), which answers what huggingface.co answers for a gated repository
without a token: that HTTP exchange is the only part that cannot run here."""

from __future__ import annotations

import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from tests.conftest import load_script

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fetch_models():
    return load_script("fetch_models")


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME; no token from the environment or a developer's token file."""
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                 "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    return home


@pytest.fixture(scope="module")
def tiny_birefnet(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    return load_script("make_tiny_models").make_tiny_birefnet(out)


def cache_like_a_download(hf_home: Path, repo_id: str, model_dir: Path) -> Path:
    """``model_dir`` in the hub cache as a download of ``repo_id``@main leaves it:
    files in blobs/, the snapshot's entries symlinks to them, refs/main the commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for file in model_dir.rglob("*"):
        if file.is_file():
            blob = repo / "blobs" / f"{abs(hash(file.read_bytes())):x}-{file.name}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, blob)
            link = snapshot / file.relative_to(model_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def write_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"applications": [{"name": "strata", "import_path": "serve_app.app:build_app", "args": {
        "default_model": "birefnet",
        "segmentation": {
            "birefnet": {"engine": "birefnet", "weights": "ZhengPeng7/BiRefNet"},
            "rmbg": {"engine": "birefnet", "weights": "briaai/RMBG-2.0"},
            "classic": {"engine": "classic"},
        },
    }}]}))
    return path


def model_bytes(model_dir: Path) -> int:
    return sum(file.stat().st_size for file in model_dir.rglob("*") if file.is_file())


def test_check_lists_a_cached_model_with_its_size_and_a_missing_one_and_exits_1(
        fetch_models, hf_home, tiny_birefnet, tmp_path, capsys):
    snapshot = cache_like_a_download(hf_home, "ZhengPeng7/BiRefNet", tiny_birefnet)
    assert fetch_models.main(["--config", str(write_config(tmp_path / "config.yaml")), "--check"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    birefnet = next(line for line in lines if "ZhengPeng7/BiRefNet" in line)
    rmbg = next(line for line in lines if "briaai/RMBG-2.0" in line)
    assert birefnet.split()[0] == "cached" and str(snapshot) in birefnet
    assert fetch_models.human_size(model_bytes(tiny_birefnet)) in birefnet
    assert rmbg.split()[0] == "MISSING" and "not cached" in rmbg
    assert "classic" not in captured.out  # no weights, nothing to fetch
    assert "1 of 2 models missing or unable to run" in captured.err


def test_check_exits_0_when_every_model_is_cached(fetch_models, hf_home, tiny_birefnet, tmp_path, capsys):
    cache_like_a_download(hf_home, "ZhengPeng7/BiRefNet", tiny_birefnet)
    cache_like_a_download(hf_home, "briaai/RMBG-2.0", tiny_birefnet)
    assert fetch_models.main(["--config", str(write_config(tmp_path / "config.yaml")), "--check"]) == 0
    assert capsys.readouterr().out.count("cached ") == 2


def test_check_names_the_packages_a_cached_models_code_needs_and_how_to_install_them(
        fetch_models, hf_home, tiny_birefnet, tmp_path, capsys):
    needy = tmp_path / "needy"
    shutil.copytree(tiny_birefnet, needy)
    code = (needy / "birefnet.py").read_text()
    (needy / "birefnet.py").write_text(code.replace("import torch\n", "import torch\nimport strata_no_such_package\n", 1))
    cache_like_a_download(hf_home, "ZhengPeng7/BiRefNet", needy)
    cache_like_a_download(hf_home, "briaai/RMBG-2.0", tiny_birefnet)
    assert fetch_models.main(["--config", str(write_config(tmp_path / "config.yaml")), "--check"]) == 1
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "CANNOT RUN" in line]
    assert "ZhengPeng7/BiRefNet" in line and "strata_no_such_package" in line
    assert "pip install -e '.[remote-code]'" in line


def test_check_reads_the_models_of_the_shipped_configs(fetch_models, hf_home, capsys):
    # configs/local.yaml: BiRefNet, RMBG-2.0 and Qwen-Image-Layered; classic engines skipped.
    assert fetch_models.main(["--check"]) == 1
    out = capsys.readouterr().out
    for repo in ("ZhengPeng7/BiRefNet", "briaai/RMBG-2.0", "Qwen/Qwen-Image-Layered"):
        assert f"MISSING  {repo}" in out


def test_a_missing_local_directory_is_reported_missing(fetch_models, hf_home, tiny_birefnet, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"args": {"segmentation": {
        "tiny": {"weights": str(tiny_birefnet)},
        "gone": {"weights": str(tmp_path / "no-such-model")},
    }}}]}))
    assert fetch_models.main(["--config", str(config), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"cached   {tiny_birefnet}" in out
    assert f"MISSING  {tmp_path / 'no-such-model'}" in out and "local directory" in out


class GatedHub(BaseHTTPRequestHandler):
    """What huggingface.co answers for a gated repository asked for without a token."""

    def do_GET(self):
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model briaai/RMBG-2.0 is restricted. You must have access "
                                            "to it and be authenticated to access it. Please log in.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def gated_hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


def test_a_gated_model_without_a_token_says_to_accept_its_terms_and_set_hf_token(
        fetch_models, hf_home, gated_hub, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"args": {"segmentation": {
        "rmbg": {"weights": "briaai/RMBG-2.0"}}}}]}))
    assert fetch_models.main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert ("briaai/RMBG-2.0 is gated: accept its terms on https://huggingface.co/briaai/RMBG-2.0, "
            "then set HF_TOKEN") in err
    assert not (hf_home / "hub" / "models--briaai--RMBG-2.0" / "snapshots").exists()


def test_a_gated_model_with_a_token_without_access_says_whose_terms_to_accept(
        fetch_models, hf_home, gated_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"args": {"segmentation": {
        "rmbg": {"weights": "briaai/RMBG-2.0"}}}}]}))
    assert fetch_models.main(["--config", str(config)]) == 1
    assert "the token in HF_TOKEN has no access" in capsys.readouterr().err


def test_an_unreachable_hub_is_named(fetch_models, hf_home, tmp_path, capsys, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert fetch_models.main(["--config", str(write_config(tmp_path / "config.yaml"))]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Hugging Face hub at http://127.0.0.1:{port} to download ZhengPeng7/BiRefNet" in err
