"""Atomic file writes and checksums: a crash never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cnnkit.errors import CnnkitError


class StorageError(CnnkitError):
    """Writing a file failed (disk full, no permission); the previous version is intact."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    The temporary file lives in the same directory so the rename is atomic on POSIX.
    On any exception the temporary file is removed and `path` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"no space left on the device while writing {path}; the previous version of the "
                               "file is intact. Free some space, then run the command again (or --resume the run).") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise StorageError(f"cannot write {path}: {e.strerror}. Choose another location (e.g. --output).") from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def save_with(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Call writer(tmp_name) and move the result atomically to `path`."""
    with atomic_path(path) as tmp:
        writer(str(tmp))
