"""One progress-bar style for all long work (calibration, evaluation, benchmarks).

Bars go to stderr so stdout stays clean for results piped elsewhere. Where stderr is no
terminal (a log file, CI, `nohup`), rich draws nothing while a bar runs, and nothing at
all for a transient one, so there each task also prints a plain line every `log_every_s`
seconds, and a transient one that did also prints one when it completes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["LOG_EVERY_S", "progress_bar"]

LOG_EVERY_S = 30.0


class _LoggingProgress(Progress):
    """rich's Progress, plus a plain line per task now and then off a terminal."""

    def __init__(self, *columns: ProgressColumn, log_every_s: float,
                 clock: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(*columns, get_time=clock, **kwargs)
        self._log_every_s = log_every_s
        self._logged: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if self.disable or self.console.is_terminal:
            return
        last = self._logged.get(task_id)
        if last == math.inf:  # its completion is already printed
            return
        task = next(t for t in self.tasks if t.id == task_id)
        now = self.get_time()
        if task.finished:
            # Its end, after the lines it printed on the way, where rich prints nothing: a
            # transient bar (a kept one prints its last state itself; a short task, nothing).
            if last is None or not self.live.transient:
                return
        else:
            if last is None:
                last = now if task.start_time is None else task.start_time
            if now - last < self._log_every_s:
                return
        self._logged[task_id] = math.inf if task.finished else now
        fields = "".join(f", {k} {v}" for k, v in task.fields.items())
        total = "?" if task.total is None else f"{task.total:g}"
        # markup=False: descriptions and fields can hold user data (paths, transcripts).
        self.console.print(f"{task.description}: {task.completed:g}/{total}{fields}, "
                           f"{task.elapsed or 0.0:.0f} s", markup=False, highlight=False)


def progress_bar(*extra: ProgressColumn, enabled: bool = True, transient: bool = False,
                 console: Console | None = None, log_every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> Progress:
    """A bar: description, bar, done/total, `extra` columns, elapsed and remaining time;
    off a terminal, a line per task every `log_every_s` seconds (`clock`'s) and, for a
    transient bar, at the end of a task that printed one."""
    return _LoggingProgress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), *extra, TimeElapsedColumn(), TimeRemainingColumn(),
        console=console or Console(stderr=True), transient=transient, disable=not enabled,
        log_every_s=log_every_s, clock=clock,
    )
