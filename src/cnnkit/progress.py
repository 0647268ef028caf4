"""Progress bars for long work, on stderr; the command line switches them on or off."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

console = Console(stderr=True)
enabled = sys.stderr.isatty()


def set_enabled(value: bool) -> None:
    global enabled
    enabled = value


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
        disable=not enabled,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with make_progress() as progress:
        task = progress.add_task(description, total=total if total is not None else len(items), info="")  # type: ignore[arg-type]
        for item in items:
            yield item
            progress.advance(task)
