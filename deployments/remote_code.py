"""Loading a model whose code ships with its weights (a hub repo's ``auto_map``), the
way its authors do: import the repo's module, build the model, load its safetensors.

Why not ``AutoModelForImageSegmentation.from_pretrained(dir, trust_remote_code=True)``:
the published BiRefNet and RMBG-2.0 code is written to transformers 4's model
contract. It replaces ``self.config`` with a plain object and never calls
``post_init()``; transformers 5's ``from_pretrained`` relies on both (weight
conversions read ``config.model_type``; loading reads the tied-weight keys that
``post_init`` sets) and fails on either, and each 4.x release breaks elsewhere. A model
with one state dict and no tied weights needs none of that machinery, so only the part
that is the same in transformers 4 and 5 is used: importing the repo's module
(``get_class_from_dynamic_module``, which also checks that its imports are installed).
Configuring such weights means running the repo's code, as ``trust_remote_code`` did.

Plain Python (no Ray, no HTTP); torch and transformers are imported when loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
NAMES_SHOWN = 5  # of missing or unexpected weights, in an error


def load_remote_model(directory: str | Path, auto_class: str = "AutoModelForImageSegmentation") -> Any:
    """The model in ``directory`` (config.json with an ``auto_map``, the repo's Python
    files, safetensors weights), built by its own code and loaded strictly, in float32.

    Raises ValueError for a directory that is not such a model or whose weights do not
    match its code, and ImportError when its code needs packages not installed here.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    path = Path(directory)
    try:
        config_dict = json.loads((path / "config.json").read_text())
    except FileNotFoundError as e:
        raise ValueError(f"{path} has no config.json") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not JSON: {e}") from e
    reference = (config_dict.get("auto_map") or {}).get(auto_class)
    if not reference:
        raise ValueError(f"{path / 'config.json'} names no code for {auto_class} in its auto_map")
    model_class = get_class_from_dynamic_module(reference, str(path), local_files_only=True)
    config_class = getattr(model_class, "config_class", None)
    if config_class is None:
        config_class = get_class_from_dynamic_module(config_dict["auto_map"]["AutoConfig"], str(path),
                                                     local_files_only=True)
    model = model_class(config=config_class.from_dict(config_dict))
    missing, unexpected = model.load_state_dict(read_state_dict(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"the weights in {path} do not match its code: {_names(missing)} missing, "
                         f"{_names(unexpected)} unexpected")
    return model.float()


def unimportable_packages(directory: str | Path) -> list[str]:
    """The packages the code in ``directory`` imports that do not import here, each with
    why when it is installed but broken (e.g. a torchvision built for another torch)."""
    import importlib

    from transformers.dynamic_module_utils import get_imports

    needed = sorted({name for file in Path(directory).glob("*.py") for name in get_imports(file)})
    missing = []
    for name in needed:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            missing.append(name)
        except Exception as e:  # noqa: BLE001 - installed but cannot import: say how it fails
            missing.append(f"{name} ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
    return missing


def read_state_dict(path: Path) -> dict[str, Any]:
    """Every tensor of ``path``'s safetensors weights (one file, or shards with an index)."""
    from safetensors.torch import load_file

    if (path / SAFETENSORS).is_file():
        return load_file(path / SAFETENSORS)
    if not (path / SAFETENSORS_INDEX).is_file():
        raise ValueError(f"{path} has no {SAFETENSORS} (pickled weights are never loaded)")
    shards = sorted(set(json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
    state: dict[str, Any] = {}
    for shard in shards:
        state.update(load_file(path / shard))
    return state


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
    return f"{len(names)} ({shown})" if names else "0"
