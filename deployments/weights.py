"""Where model weights come from, and where and how they run (device, dtype).

Plain Python: no Ray, no HTTP, and no torch / huggingface_hub / transformers at import
time (the ingress imports this package and must stay light); they are imported inside
the functions that need them.

A weights *source* is either a local directory or a Hugging Face hub id (``org/name``).
Both load the same way: :func:`load_pretrained` first turns the source into a local
directory, then calls the loader (``AutoModel...from_pretrained``,
``DiffusionPipeline.from_pretrained``, ...) on that directory. For a hub id:

1. the Hugging Face cache is tried first, without any network (a service that has its
   weights must start even when the hub is down or unreachable);
2. when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, that is all;
3. otherwise the snapshot is downloaded with ``huggingface_hub.snapshot_download``,
   which fails in well under a second when the hub cannot be reached (no DNS, port
   closed); calling ``from_pretrained`` on the hub id instead retries with backoff and
   takes ~25 s to fail on a machine without network.

So a cached branch revision (``main``) is not refreshed on start; pin ``revision`` to
a commit, or download it again (``hf download MODEL_ID``), to move to newer weights.

Hugging Face conventions are read from the environment *when called* (not at import),
so tests and config can set them late: ``HF_HOME`` / ``HF_HUB_CACHE`` (the cache),
``HF_TOKEN`` (gated and private repos), ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` (a mirror),
``HF_HUB_ETAG_TIMEOUT``. Every way of not getting the weights is raised as
:class:`WeightsUnavailable`, whose ``reason`` says what to do about it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRUE = {"1", "on", "yes", "true"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
_FETCH_HINT = (
    "download it on a machine with network (`hf download MODEL_ID`, then copy the cache), "
    "or set weights to a local directory"
)


class WeightsUnavailable(RuntimeError):
    """The weights cannot be had here; ``reason`` says why and what to do."""

    def __init__(self, reason: str, *, source: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.source = source


# --------------------------------------------------------------------------- device


def resolve_device(setting: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; otherwise the
    setting itself (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), checked for form."""
    import torch

    setting = (setting or "auto").strip().lower()
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(setting)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device {setting!r} is not a torch device (auto, cpu, cuda, cuda:N)") from e
    return setting


def resolve_dtype(setting: str, device: str) -> "torch.dtype":
    """The torch dtype to run in on ``device`` (a resolved device string).

    ``"auto"``: bfloat16 on GPUs that do it natively (compute capability 8.0+),
    float16 on older ones, float32 elsewhere. Explicit ``"float16"``, ``"bfloat16"``,
    ``"float32"`` (or fp16/bf16/fp32/half) are honoured, except that a half dtype on
    the CPU falls back to float32 (slow or unsupported there), with a log line.
    """
    import torch

    setting = (setting or "auto").strip().lower()
    kind = device.split(":", 1)[0]
    if setting == "auto":
        if kind != "cuda":
            return torch.float32
        return torch.bfloat16 if _cuda_has_bf16(device) else torch.float16
    name = _DTYPES.get(setting)
    if name is None:
        raise ValueError(f"dtype {setting!r} is not one of auto, float32, float16, bfloat16")
    if kind == "cpu" and name != "float32":
        log.warning("dtype %s asked for on the CPU: using float32 (half precision is slow or "
                    "unsupported on CPUs)", name)
        return torch.float32
    return getattr(torch, name)


def canonical_dtype(setting: str | None, *extra: str) -> str:
    """``setting``'s canonical name (``"bf16"`` -> ``"bfloat16"``, ``None`` -> ``"auto"``);
    ``extra`` names settings an engine adds (e.g. ``"autocast"``). Raises ValueError."""
    setting = (setting or "auto").strip().lower()
    if setting == "auto" or setting in extra:
        return setting
    if setting not in _DTYPES:
        raise ValueError(f"dtype {setting!r} is not one of {', '.join(['auto', *extra, 'float32', 'float16', 'bfloat16'])}")
    return _DTYPES[setting]


def dtype_name(dtype: "torch.dtype") -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (for EngineInfo and health output)."""
    return str(dtype).removeprefix("torch.")


def _cuda_has_bf16(device: str) -> bool:
    import torch

    try:
        major, _minor = torch.cuda.get_device_capability(device)
    except Exception:  # no driver, bad index: let the later .to(device) say so
        return False
    return major >= 8


# --------------------------------------------------------------------------- sources


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def hub_offline() -> bool:
    """Whether the Hugging Face conventions say: no network (read now, not at import)."""
    return _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")


def hub_cache_dir() -> str:
    """The Hugging Face hub cache directory as the environment says now."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        path = env["HF_HUB_CACHE"]
    elif env.get("HUGGINGFACE_HUB_CACHE"):
        path = env["HUGGINGFACE_HUB_CACHE"]
    elif env.get("HF_HOME"):
        path = os.path.join(env["HF_HOME"], "hub")
    else:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        path = os.path.join(xdg, "huggingface", "hub")
    return os.path.abspath(os.path.expanduser(path))


def _cache_description() -> str:
    home = os.environ.get("HF_HOME")
    cache = hub_cache_dir()
    return f"HF_HOME={home}, cache {cache}" if home else f"cache {cache}"


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.match(source)) and ".." not in source and not os.path.exists(source)


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or source in (".", "..")
        or "\\" in source
        or source.count("/") >= 2
        or source.endswith("/")
        or os.path.isabs(source)
    )


@dataclass(frozen=True)
class ResolvedSource:
    """A source turned into a local directory; ``origin`` is local, cache or hub."""

    source: str
    path: str
    origin: str
    revision: str | None = None


def resolve_source(
    source: str,
    *,
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
    cache_only: bool = False,
) -> ResolvedSource:
    """Turn a hub id or local directory into a local directory (downloading if allowed).

    ``allow_patterns`` / ``ignore_patterns`` (fnmatch, as huggingface_hub) limit what a
    hub snapshot fetches, e.g. to skip ONNX exports and pickled duplicates. Raises
    :class:`WeightsUnavailable`.
    """
    source = (source or "").strip()
    if not source:
        raise WeightsUnavailable("no weights configured: set weights to a hub id (org/name) "
                                 "or a local directory", source=source)
    local = os.path.expanduser(source)
    if os.path.isdir(local):
        if revision:
            log.warning("revision %r ignored: weights %s is a local directory", revision, source)
        return ResolvedSource(source, os.path.abspath(local), "local")
    if os.path.exists(local):
        raise WeightsUnavailable(f"{source} is a file, not a model directory: set weights to the "
                                 "directory that holds config.json", source=source)
    if _looks_like_path(source) or not _HUB_ID.match(source):
        if _looks_like_path(source):
            reason = f"local directory {os.path.abspath(local)} does not exist"
        else:
            reason = (f"{source!r} is neither a local directory nor a Hugging Face model id "
                      "(org/name)")
        raise WeightsUnavailable(reason, source=source)
    return _resolve_hub(source, revision=revision, allow_patterns=allow_patterns,
                        ignore_patterns=ignore_patterns, cache_only=cache_only)


def _resolve_hub(repo_id, *, revision, allow_patterns, ignore_patterns, cache_only) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    rev_text = f" at revision {revision}" if revision else ""
    common: dict[str, Any] = dict(
        repo_id=repo_id,
        revision=revision,
        cache_dir=hub_cache_dir(),
        allow_patterns=list(allow_patterns) if allow_patterns else None,
        ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
    )
    # 1. The cache, no network at all.
    try:
        path = snapshot_download(**common, local_files_only=True)
        return ResolvedSource(repo_id, path, "cache", revision)
    except LocalEntryNotFoundError as e:  # includes IncompleteSnapshotError
        cached_error: Exception = e
    except ValueError as e:  # malformed id that slipped through our check
        raise WeightsUnavailable(f"{repo_id!r} is not a valid Hugging Face model id: {e}",
                                 source=repo_id) from e

    # 2. Offline: nothing more to try.
    if cache_only or hub_offline():
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "downloads are disabled"
        incomplete = "incompletely " if type(cached_error).__name__ == "IncompleteSnapshotError" else "not "
        raise WeightsUnavailable(
            f"{repo_id}{rev_text} is {incomplete}in the Hugging Face cache ({_cache_description()}) "
            f"and {why}: {_FETCH_HINT}",
            source=repo_id,
        ) from cached_error

    # 3. The hub.
    try:
        path = snapshot_download(**common, **_online_kwargs())
    except Exception as e:
        raise _hub_error(repo_id, revision, e) from e
    return ResolvedSource(repo_id, path, "hub", revision)


def _online_kwargs() -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if os.environ.get("HF_ENDPOINT"):
        kwargs["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/")
    timeout = os.environ.get("HF_HUB_ETAG_TIMEOUT")
    if timeout:
        try:
            kwargs["etag_timeout"] = float(timeout)
        except ValueError:
            pass
    return kwargs


def _has_token() -> bool:
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:
        return bool(os.environ.get("HF_TOKEN"))


def _hub_error(repo_id: str, revision: str | None, e: Exception) -> WeightsUnavailable:
    """Map a huggingface_hub / network error to a reason a person can act on."""
    from huggingface_hub import errors as hf

    url = f"https://huggingface.co/{repo_id}"
    if isinstance(e, hf.GatedRepoError):
        if _has_token():
            reason = (f"{repo_id} is gated and the token in HF_TOKEN has no access: accept its terms "
                      f"at {url} with that token's account")
        else:
            reason = f"{repo_id} is gated: accept its terms on huggingface.co ({url}) and set HF_TOKEN"
    elif isinstance(e, hf.RevisionNotFoundError):
        reason = f"{repo_id} has no revision {revision!r} on the hub: check the revision setting"
    elif isinstance(e, hf.RepositoryNotFoundError):
        token = "" if _has_token() else ", or set HF_TOKEN if it is private"
        reason = (f"{repo_id} was not found on the Hugging Face hub and is not a local directory "
                  f"either: check the id{token}")
    elif isinstance(e, hf.DisabledRepoError):
        reason = f"{repo_id} has been disabled on the Hugging Face hub"
    elif isinstance(e, hf.LocalEntryNotFoundError):  # connection failed and no cache
        reason = (f"{repo_id} is not in the Hugging Face cache ({_cache_description()}) and the hub "
                  f"cannot be reached: {_FETCH_HINT}")
    elif isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            reason = f"the Hugging Face hub refused the token in HF_TOKEN for {repo_id}: check the token"
        else:
            reason = (f"the Hugging Face hub answered HTTP {status} for {repo_id} and it is not cached "
                      f"({_cache_description()}): try again later, or {_FETCH_HINT}")
    elif isinstance(e, OSError):  # disk full, permissions, ...
        reason = f"could not store {repo_id} in the Hugging Face cache ({_cache_description()}): {e}"
    else:  # proxy and other network errors
        reason = (f"could not download {repo_id} from the Hugging Face hub "
                  f"({type(e).__name__}: {e}): {_FETCH_HINT}")
    return WeightsUnavailable(reason, source=repo_id)


# --------------------------------------------------------------------------- loading


def load_pretrained(
    loader: Callable[..., T],
    source: str,
    *,
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
    pip_hint: str | None = None,
    **kwargs: Any,
) -> T:
    """``loader(local_dir, **kwargs)`` for a hub id or local directory ``source``.

    ``loader`` is any ``from_pretrained``-like callable (transformers, diffusers, ...);
    it always receives a local directory, never a hub id, so it does no network I/O of
    its own. Raises :class:`WeightsUnavailable` when the weights cannot be had or the
    directory cannot be loaded (OSError / ValueError from the loader: missing or
    unreadable files); an ImportError (remote code that needs packages not installed)
    is raised as WeightsUnavailable too, with ``pip_hint`` appended.
    """
    resolved = resolve_source(source, revision=revision, allow_patterns=allow_patterns,
                              ignore_patterns=ignore_patterns)
    log.info("loading %s from %s (%s)", source, resolved.path, resolved.origin)
    try:
        return _call(loader, resolved, pip_hint, kwargs)
    except (OSError, ValueError) as e:
        if resolved.origin != "cache" or hub_offline():
            raise _load_error(source, resolved, e) from e
        first = e
    # A cached snapshot that the loader found lacking (files fetched one by one by an
    # earlier from_pretrained call leave partial snapshots): complete it from the hub.
    log.warning("cached snapshot of %s could not be loaded (%s): completing it from the hub",
                source, first)
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=source, revision=revision, cache_dir=hub_cache_dir(),
                                 allow_patterns=list(allow_patterns) if allow_patterns else None,
                                 ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
                                 **_online_kwargs())
    except Exception as e:
        err = _hub_error(source, revision, e)
        raise WeightsUnavailable(f"{source} could not be loaded from its cached snapshot "
                                 f"{resolved.path} ({_message(first)}), and fetching it again "
                                 f"failed: {err.reason}", source=source) from first
    resolved = ResolvedSource(source, path, "hub", revision)
    try:
        return _call(loader, resolved, pip_hint, kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(source, resolved, e) from e


def _call(loader: Callable[..., T], resolved: ResolvedSource, pip_hint: str | None,
          kwargs: dict[str, Any]) -> T:
    try:
        return loader(resolved.path, **kwargs)
    except ImportError as e:
        hint = f"; install them: {pip_hint}" if pip_hint else ""
        raise WeightsUnavailable(f"{resolved.source} needs Python packages that are not installed "
                                 f"here: {_message(e)}{hint}", source=resolved.source) from e


def _message(e: Exception, limit: int = 500) -> str:
    message = " ".join(str(e).split()) or type(e).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _load_error(source: str, resolved: ResolvedSource, e: Exception) -> WeightsUnavailable:
    message = _message(e)
    where = "local directory" if resolved.origin == "local" else f"{resolved.origin} snapshot"
    return WeightsUnavailable(f"{source} could not be loaded from {where} {resolved.path}: "
                              f"{message}", source=source)


__all__ = [
    "ResolvedSource",
    "WeightsUnavailable",
    "canonical_dtype",
    "dtype_name",
    "hub_cache_dir",
    "hub_offline",
    "is_hub_id",
    "load_pretrained",
    "resolve_device",
    "resolve_dtype",
    "resolve_source",
]
