"""Downloads that are checked before use: a half-downloaded or wrong file never reaches the loader."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from cnnkit.errors import DataError
from cnnkit.fileio import atomic_path, file_digest

log = logging.getLogger(__name__)


def cnnkit_home() -> Path:
    """Where cnnkit keeps datasets and caches: $CNNKIT_HOME, else the user's cache directory."""
    if os.environ.get("CNNKIT_HOME"):
        return Path(os.environ["CNNKIT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnkit"


def download(url: str, dest: Path, md5: str, timeout: float = 30.0) -> Path:
    """Download `url` to `dest`, verify its md5, and only then move it into place."""
    log.info("downloading %s", url)
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DataError(f"could not download {url}: {getattr(e, 'reason', e)}") from None
        verify_md5(tmp, md5, what=url)
    return dest


def verify_md5(path: Path, expected: str, what: str | None = None) -> None:
    actual = file_digest(path, "md5")
    if actual != expected:
        raise DataError(
            f"{what or path}: checksum mismatch (md5 {actual}, expected {expected}). "
            "The file is corrupt, truncated or not the official one: delete it and provide it again."
        )
