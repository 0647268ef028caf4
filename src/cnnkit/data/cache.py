"""Decode once: decoded uint8 arrays cached as safetensors, keyed by source checksum and preprocessing."""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from cnnkit.data.download import cnnkit_home
from cnnkit.fileio import save_with

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
FORMAT = 2  # bump when the file layout changes, so old caches are ignored rather than reported corrupt


def cache_key(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(name: str, key: str, cache_dir: Path | None = None) -> Path:
    """Where `cached_arrays` keeps (or would keep) the arrays of `name` and `key`."""
    return (cache_dir or cnnkit_home() / "cache") / f"{name}-{key}-v{FORMAT}.safetensors"


def cached_arrays(
    name: str, key: str, build: Callable[[], tuple[Arrays, dict[str, str]]], cache_dir: Path | None = None,
    what: str = "decoded arrays",
) -> tuple[Arrays, dict[str, str]]:
    """Return (arrays, metadata) from the cache, or build, store and return them (`what` they are, for the log).

    A cache file that cannot be read (torn, corrupted) is reported and rebuilt, never trusted.
    """
    path = cache_path(name, key, cache_dir)
    if path.exists():
        try:
            arrays = load_file(path)
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(header_len)).get("__metadata__", {})
            if meta.get("crc32") != _checksums(arrays):
                raise ValueError("checksum mismatch")
            return arrays, meta
        except (SafetensorError, OSError, ValueError) as e:
            log.warning("cache file %s is corrupt (%s); computing the %s again", path, e, what)
    arrays, meta = build()
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = {**meta, "crc32": _checksums(arrays)}
    save_with(path, lambda tmp: save_file(arrays, tmp, metadata=meta))
    log.info("cached %s at %s", what, path)
    return arrays, meta


def _checksums(arrays: Arrays) -> str:
    """crc32 of every array (about 1 GB/s): catches flipped bytes that the format itself would not."""
    return json.dumps({k: zlib.crc32(memoryview(np.ascontiguousarray(v)).cast("B")) for k, v in sorted(arrays.items())})
