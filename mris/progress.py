"""Progress bars for long work (rich), one style everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

CAPTURED_WIDTH = 160
"""Columns of output that goes to a file or a pipe (rich's default there is 80, which wraps the
summary tables mid-cell); a terminal's own width, or ``COLUMNS``, wins."""


def make_console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) that does not wrap at 80 columns when captured."""
    import os
    import sys

    stream = sys.stderr if stderr else sys.stdout
    captured = not stream.isatty() and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, width=CAPTURED_WIDTH if captured else None)


console = make_console(stderr=True)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A rich ``Progress`` on stderr; ``enabled=False`` gives a silent one (tests, library use)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
    with progress:
        yield progress


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class EpochClock:
    """ "epoch n/N (this epoch's seconds, ETA of the run's remaining epochs)" for a training's
    per-epoch lines, from the cumulative training seconds each epoch's record carries
    (``record["seconds"]``) and the run's length (``record["epochs"]``). The ETA is the mean
    epoch time seen so far times the epochs left, per name (region or model)."""

    def __init__(self) -> None:
        self._last_seconds: dict[str, float] = {}
        self._durations: dict[str, list[float]] = {}

    def describe(self, name: str, record: dict) -> str:
        epoch, total, seconds = int(record["epoch"]), record.get("epochs"), record.get("seconds")
        text = f"{name} epoch {epoch}/{total}" if total else f"{name} epoch {epoch}"
        if seconds is None:
            return text
        previous = self._last_seconds.get(name, 0.0 if epoch == 1 else None)
        self._last_seconds[name] = float(seconds)
        if previous is None:  # the first epoch after a resume: its own time is unknown
            return text
        this_epoch = max(0.0, float(seconds) - previous)
        durations = self._durations.setdefault(name, [])
        durations.append(this_epoch)
        details = [f"{this_epoch:.0f} s"]
        if total and total > epoch:
            details.append(f"ETA {_duration((total - epoch) * sum(durations) / len(durations))}")
        return f"{text} ({', '.join(details)})"
