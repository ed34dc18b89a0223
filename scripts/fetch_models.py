#!/usr/bin/env python
"""Download the models a Serve config names into the Hugging Face cache, or check them.

    python scripts/fetch_models.py                              # configs/local.yaml
    python scripts/fetch_models.py --config configs/cluster.yaml
    python scripts/fetch_models.py --check                      # cached? how big? exit 1 if any is missing

Every model under an application's ``args.segmentation`` and ``args.layered`` that has
``weights`` (``classic`` engines have none) is fetched at its ``revision`` with
``huggingface_hub.snapshot_download`` into the cache the services read (``HF_HOME``,
``HF_HUB_CACHE``), with its progress bars, skipping the files the engine never loads
(the engines' own ``HUB_IGNORE_PATTERNS``). ``HF_TOKEN`` is used for gated models
(RMBG-2.0: accept its terms on huggingface.co first); ``HF_ENDPOINT`` for a mirror.
Weights that are a local directory are only checked, never downloaded.

Fetching again updates a branch revision (``main``) to the hub's latest; the services
themselves never refresh a cached model, so this is how to move them to newer weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `deployments` when run as a script from anywhere

from deployments import birefnet, qwen_layered  # noqa: E402  (torch-free imports)
from deployments.remote_code import unimportable_packages  # noqa: E402
from deployments.weights import hub_cache_dir, is_hub_id  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "local.yaml"
IGNORE_PATTERNS = {
    "birefnet": birefnet.HUB_IGNORE_PATTERNS,
    "qwen-image-layered": qwen_layered.HUB_IGNORE_PATTERNS,
}


class ModelWeights(NamedTuple):
    """One configured model's weights: what the services will load."""

    names: tuple[str, ...]          # config names using these weights (birefnet, layers of ...)
    engine: str
    weights: str
    revision: str | None

    @property
    def label(self) -> str:
        return f"{self.weights}@{self.revision}" if self.revision else self.weights


def configured_weights(config: dict) -> list[ModelWeights]:
    """The distinct weights of every application's models, in config order."""
    found: dict[tuple[str, str | None, str], list[str]] = {}
    for app in config.get("applications") or []:
        args = app.get("args") or {}
        for section in ("segmentation", "layered"):
            for name, model in (args.get(section) or {}).items():
                engine = model.get("engine") or ("birefnet" if section == "segmentation" else "qwen-image-layered")
                if engine == "classic" or not model.get("weights"):
                    continue
                key = (model["weights"], model.get("revision"), engine)
                found.setdefault(key, []).append(name)
    return [ModelWeights(tuple(names), engine, weights, revision)
            for (weights, revision, engine), names in found.items()]


def cached_path(model: ModelWeights) -> Path | None:
    """Where the model's files are on this machine, or None. No network."""
    if not is_hub_id(model.weights):
        path = Path(model.weights).expanduser()
        return path if path.is_dir() else None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=model.weights, revision=model.revision, cache_dir=hub_cache_dir(),
                                      ignore_patterns=list(IGNORE_PATTERNS[model.engine]),
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def size_on_disk(path: Path) -> int:
    """Bytes of the files under ``path``; a cache's symlinks count once per blob."""
    seen: set[Path] = set()
    total = 0
    for file in path.rglob("*"):
        real = file.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            total += real.stat().st_size
    return total


def human_size(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _has_token() -> bool:
    import huggingface_hub

    return bool(huggingface_hub.get_token())


def download_error(model: ModelWeights, error: Exception) -> str:
    """What to do about a failed download, in words."""
    from huggingface_hub import errors

    url = f"https://huggingface.co/{model.weights}"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, errors.GatedRepoError):
        if _has_token():
            return (f"{model.weights} is gated and the token in HF_TOKEN has no access: accept its terms "
                    f"on {url} while logged in as that token's account")
        return f"{model.weights} is gated: accept its terms on {url}, then set HF_TOKEN to a token of that account"
    if status == 401:
        if _has_token():
            return f"the Hugging Face hub refused the token in HF_TOKEN for {model.weights}: check the token"
        return f"{model.weights} needs a Hugging Face token: set HF_TOKEN (and accept its terms on {url} if gated)"
    if isinstance(error, errors.LocalEntryNotFoundError):  # huggingface_hub's word for "no connection"
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        return f"cannot reach the Hugging Face hub at {endpoint} to download {model.label}: check the network"
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{model.weights} has no revision {model.revision!r}: check `revision` in the config"
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"{model.weights} was not found on the Hugging Face hub: check `weights` in the config"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"could not download {model.label}: {type(error).__name__}: {first_line}"


def fetch(model: ModelWeights) -> Path:
    """Download (or complete, or update) the model in the cache; returns its snapshot."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=model.weights, revision=model.revision, cache_dir=hub_cache_dir(),
                                  ignore_patterns=list(IGNORE_PATTERNS[model.engine]),
                                  endpoint=os.environ.get("HF_ENDPOINT") or None))


def check(models: list[ModelWeights]) -> int:
    """Print each model, whether it is here and its size, and whether the packages its
    code imports are installed; 1 when any is missing or cannot run."""
    missing = 0
    print(f"Hugging Face cache: {hub_cache_dir()}")
    for model in models:
        path = cached_path(model)
        used_by = ", ".join(model.names)
        if path is None:
            missing += 1
            where = "local directory" if not is_hub_id(model.weights) else "not cached"
            print(f"  MISSING  {model.label}  ({used_by}): {where}")
        else:
            print(f"  cached   {model.label}  ({used_by}): {human_size(size_on_disk(path))} in {path}")
            if model.engine == "birefnet" and (packages := unimportable_packages(path)):
                missing += 1
                print(f"  CANNOT RUN  {model.label}: its code imports {', '.join(packages)}; "
                      f"install them: {birefnet.PIP_HINT}")
    if missing:
        print(f"{missing} of {len(models)} models missing or unable to run: see above; fetch weights with "
              "python scripts/fetch_models.py (with --config if not configs/local.yaml)", file=sys.stderr)
    return 1 if missing else 0


def download(models: list[ModelWeights]) -> int:
    """Fetch every model; say what went wrong for each that failed; 1 when any did."""
    failed = []
    print(f"Hugging Face cache: {hub_cache_dir()}")
    for model in models:
        if not is_hub_id(model.weights):
            path = cached_path(model)
            state = "present" if path else "MISSING (a local directory: copy it there)"
            print(f"{model.label} ({', '.join(model.names)}): local directory, {state}")
            if path is None:
                failed.append(model.label)
            continue
        print(f"{model.label} ({', '.join(model.names)}):")
        try:
            path = fetch(model)
        except Exception as error:  # every hub failure becomes one readable line
            print(f"  FAILED: {download_error(model, error)}", file=sys.stderr)
            failed.append(model.label)
            continue
        print(f"  {human_size(size_on_disk(path))} in {path}")
    if failed:
        print(f"not fetched: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a Serve config (configs/local.yaml)")
    parser.add_argument("--check", action="store_true",
                        help="download nothing: list each model, whether it is cached, its size; exit 1 if any is missing")
    args = parser.parse_args(argv)
    models = configured_weights(yaml.safe_load(args.config.read_text()))
    if not models:
        print(f"{args.config} names no model with weights (classic engines need none)")
        return 0
    return check(models) if args.check else download(models)


if __name__ == "__main__":
    sys.exit(main())
