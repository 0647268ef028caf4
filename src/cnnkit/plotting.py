"""The one matplotlib set-up: a headless backend, and figures saved atomically as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnkit.fileio import save_with


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use: the
    import costs about a second, which commands that draw nothing should not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    """Write `fig` to `path` as PNG (temporary file and rename) and close it."""
    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    pyplot().close(fig)


def png_bytes(fig: Any, dpi: int = 100) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()
