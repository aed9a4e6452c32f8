"""The one progress bar of the command lines (backtest, backfill, optimisation).

A Rich bar: the task's description, the bar, `done/total`, then the time left (or the time
spent, where the total is a plan that may stop early). Rich is imported on first use, so a
daemon that never draws a bar never loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from rich.progress import Progress


@contextmanager
def progress_bar(
    *, elapsed: bool = False, transient: bool = False, stderr: bool = False
) -> Iterator[Progress]:
    """Yield a running Rich `Progress` with the house columns; it stops on exit.

    Args:
        elapsed: show the time spent instead of the time left.
        transient: erase the bar when done.
        stderr: draw on stderr instead of stdout.

    Yields:
        The progress display: `add_task`, `advance` and `update` draw on it.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn() if elapsed else TimeRemainingColumn(),
        console=Console(stderr=True) if stderr else None,
        transient=transient,
    ) as progress:
        yield progress
