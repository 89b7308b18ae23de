"""Progress off a terminal: plain lines at an interval and at the end, no markup."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import TextColumn

from sfc.progress import progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(terminal: bool, transient: bool) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200)
    clock = Clock()
    with progress_bar(TextColumn("{task.fields[loss]}"), console=console, clock=clock,
                      log_every_s=30.0, transient=transient) as bar:
        task = bar.add_task("search [bold]/data/x[/bold]", total=10, loss="-")
        for step in range(10):
            clock.now += 7.0
            bar.update(task, advance=1, loss=f"{step / 10:.1f}")
    return [line for line in out.getvalue().splitlines() if line.strip()]


def test_lines_at_interval_and_end_off_a_terminal() -> None:
    lines = _run(terminal=False, transient=True)
    # 7 s a step: past 30 s at step 5 (35 s), past 30 more at 10 (which is also the end).
    assert lines == [
        "search [bold]/data/x[/bold]: 5/10, loss 0.4, 35 s",
        "search [bold]/data/x[/bold]: 10/10, loss 0.9, 70 s",
    ]


def test_a_short_task_prints_nothing_and_a_kept_bar_no_second_end() -> None:
    out = io.StringIO()
    clock = Clock()
    with progress_bar(console=Console(file=out, force_terminal=False), clock=clock,
                      transient=True) as bar:
        task = bar.add_task("eval", total=2)
        bar.advance(task)
        bar.advance(task)  # done within the interval: no line at all
    assert not [line for line in out.getvalue().splitlines() if line.strip()]
    lines = _run(terminal=False, transient=False)
    # The interval line, then rich's own last state of the kept bar (not a plain line).
    assert lines[0] == "search [bold]/data/x[/bold]: 5/10, loss 0.4, 35 s"
    assert not any(line.startswith("search [bold]/data/x[/bold]: 10/10") for line in lines)
    assert len(lines) == 2 and "10/10" in lines[1]


def test_no_plain_lines_on_a_terminal() -> None:
    lines = _run(terminal=True, transient=True)
    assert not any(", loss " in line for line in lines)
