"""Job inputs and results, by key: ``jobs/<id>/input.png``, ``jobs/<id>/layer_01.png``.

Keys are relative, ``/``-separated paths made of plain names (letters, digits,
``_``, ``-``, ``.``; no name may start with ``.``), so a key can never escape the
store's root (``..``, absolute paths, drive letters and backslashes are refused
with ValueError) and never collides with the hidden temporary files that make
writes atomic.

The interface (:class:`Storage`) is small so that :class:`FsspecStorage` (S3,
GCS, any fsspec filesystem) stands beside :class:`LocalStorage`; ``path`` is the
local store's extra, for ``FileResponse``. :func:`open_storage` picks one from
the config (``jobs.results_url``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import fsspec
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:  # pragma: no cover
    from serve_app.config import JobsConfig

__all__ = ["FsspecStorage", "LocalStorage", "Storage", "check_key", "open_storage"]

_LOCAL_PROTOCOLS = {"file", "local"}

_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
_MAX_KEY_LENGTH = 1024


def check_key(key: str) -> str:
    """The key, normalised (no trailing ``/``), or ValueError when it is not a
    safe relative key."""
    if not isinstance(key, str):
        raise ValueError(f"storage key must be a string, not {type(key).__name__}")
    stripped = key[:-1] if key.endswith("/") else key
    if not stripped or len(stripped) > _MAX_KEY_LENGTH:
        raise ValueError(f"invalid storage key: {key!r}")
    for name in stripped.split("/"):
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid storage key: {key!r} (bad part {name!r})")
    return stripped


@runtime_checkable
class Storage(Protocol):
    """What the ingress needs from a store of job files."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> bool: ...


class LocalStorage:
    """Files under a local directory (created if missing).

    Writes are atomic: a temporary file in the same folder, fsync'd, then renamed
    over the key, so readers see the old content or the new, never a part. The
    ingress replicas of one machine (or of several, on a shared file system) may
    use one root at the same time.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._real_root = self.root.resolve()
        self._fsync = fsync

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """Where the key's file is (or would be). ValueError for unsafe keys,
        including keys that reach outside the root through a symbolic link."""
        target = self.root / check_key(key)
        real = target.resolve()
        if real != self._real_root and self._real_root not in real.parents:
            raise ValueError(f"storage key {key!r} leads outside the storage root")
        return target

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically, replacing what was there."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        if self._fsync:
            _fsync_dir(target.parent)

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; FileNotFoundError when there are none."""
        target = self.path(key)
        if target.is_dir():
            raise FileNotFoundError(f"no file under storage key {key!r}")
        return target.read_bytes()

    def exists(self, key: str) -> bool:
        """Whether a file is stored under ``key``."""
        return self.path(key).is_file()

    def delete_prefix(self, prefix: str) -> bool:
        """Delete everything under a folder key (e.g. ``jobs/<id>``) -- whole path
        parts only: ``jobs/ab`` does not touch ``jobs/abc``. Returns whether
        anything was there. Deleting the root itself is refused (no empty key)."""
        target = self.path(prefix)
        try:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        except FileNotFoundError:
            return False
        return True


class FsspecStorage:
    """Files under a URL on any fsspec filesystem: ``s3://bucket/prefix`` (s3fs),
    ``gs://bucket/prefix`` (gcsfs), ``memory://...``, ``file:///...``.

    A ``put`` is one whole-object write (``pipe_file``): object stores replace an
    object atomically, so readers see the old content or the new. Local and shared
    (NFS) directories get :class:`LocalStorage` from :func:`open_storage` instead,
    whose temporary-file-and-rename writes are atomic there too.

    Credentials and endpoints come the filesystem's usual way (``AWS_*`` variables,
    instance roles, Google application-default credentials) or from fsspec's
    ``FSSPEC_<PROTOCOL>_<OPTION>`` variables (``FSSPEC_S3_ENDPOINT_URL`` for MinIO);
    ``storage_options`` are passed to the filesystem as well.
    """

    def __init__(self, url: str, **storage_options: Any):
        if fsspec.utils.get_protocol(url) in _LOCAL_PROTOCOLS:
            # Local directories exist before their files; object stores have no directories.
            storage_options.setdefault("auto_mkdir", True)
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` in one write, replacing what was there."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            # Refused before anything is written, as LocalStorage refuses it.
            raise TypeError(f"storage data must be bytes, not {type(data).__name__}")
        self.fs.pipe_file(self._path(key), bytes(data))

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; FileNotFoundError when there are none."""
        path = self._path(key)
        try:
            return self.fs.cat_file(path)
        except IsADirectoryError:
            raise FileNotFoundError(f"no file under storage key {key!r}") from None

    def exists(self, key: str) -> bool:
        """Whether a file is stored under ``key``."""
        return self.fs.isfile(self._path(key))

    def delete_prefix(self, prefix: str) -> bool:
        """Delete everything under a folder key (e.g. ``jobs/<id>``) -- whole path
        parts only: ``jobs/ab`` does not touch ``jobs/abc``. Returns whether
        anything was there."""
        path = self._path(prefix)
        if not self.fs.exists(path):
            return False
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:  # deleted meanwhile by another replica
            return False
        return True


def open_storage(jobs: "JobsConfig") -> Storage:
    """The store of job inputs and results that ``jobs`` (the config's ``jobs``
    section) names.

    ``results_url`` unset: :class:`LocalStorage` in ``data_dir``; a local path or a
    ``file://`` URL: :class:`LocalStorage` there (atomic renames, and ``path`` for
    streaming files); any other URL: :class:`FsspecStorage`. ValueError when the
    URL's filesystem is unknown or its package is not installed (``s3fs``,
    ``gcsfs``: ``pip install 'strata[cloud]'``).
    """
    url = jobs.results_url
    if url is None:
        return LocalStorage(Path(jobs.data_dir).resolve())
    protocol = fsspec.utils.get_protocol(url)
    if protocol in _LOCAL_PROTOCOLS:
        return LocalStorage(LocalFileSystem._strip_protocol(url))
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise ValueError(f"jobs.results_url {url!r} cannot be opened: {e} "
                         "(S3 and GCS: pip install 'strata[cloud]')") from e
    return FsspecStorage(url)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
