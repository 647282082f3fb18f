"""Progress bars for long CLI work (rich, one per process, to stderr)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_callback(what: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(k)``: a callback that moves a progress bar over ``total`` items by k."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(what, total=total)
        yield lambda k=1: bar.advance(task, k)
