"""Job inputs and results, by key: ``jobs/<id>/input.png``, ``jobs/<id>/layer_01.png``.

Keys are relative, ``/``-separated paths made of plain names (letters, digits,
``_``, ``-``, ``.``; no name may start with ``.``), so a key can never escape the
store's root (``..``, absolute paths, drive letters and backslashes are refused
with ValueError) and never collides with the hidden temporary files that make
writes atomic.

The interface (:class:`Storage`) is small so that an fsspec-backed store (S3,
GCS) can stand beside :class:`LocalStorage`; ``path`` is the local store's extra,
for ``FileResponse``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["LocalStorage", "Storage", "check_key"]

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
