"""One progress-bar style for all long work (calibration, evaluation, benchmarks).

Bars go to stderr so stdout stays clean for results piped elsewhere.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["progress_bar"]


def progress_bar(*extra: ProgressColumn, enabled: bool = True, transient: bool = False,
                 console: Console | None = None) -> Progress:
    """A bar: description, bar, done/total, `extra` columns, elapsed and remaining time."""
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), *extra, TimeElapsedColumn(), TimeRemainingColumn(),
        console=console or Console(stderr=True), transient=transient, disable=not enabled,
    )
