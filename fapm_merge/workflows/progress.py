"""Progress a person can follow: live bars in a terminal, timestamped lines in a log.

Long commands (``tune``, ``sweep``, ``eval``, the demo's data) report through one
callback, ``report(stage, done, total, detail)``. In a terminal it draws rich's bars;
when stderr is a file or a pipe (Slurm, ``nohup``, ``> log``), where bars appear only
at the end, it writes one plain line per step instead, with the time, the count, what
is being done and an estimate of what is left.
"""

from __future__ import annotations

import contextlib
import sys
import time
from datetime import datetime
from typing import Callable, Dict, Iterator, Optional, TextIO

Report = Callable[[str, int, int, str], None]
"""``report(stage, done, total, detail)``: ``done`` of ``total`` steps of ``stage`` are
finished; ``detail`` says what is being done now."""

LOG_EVERY_SECONDS = 10.0
"""At most one line per stage this often while its detail stays the same (a sweep
reports every tensor); a new detail and the last step are always written."""


def silent(stage: str, done: int, total: int, detail: str) -> None:
    """The :data:`Report` of a caller that wants no progress (library use, tests)."""


def duration(seconds: float) -> str:
    """``41 s``, ``2.5 min``, ``1.2 h``: a length of time as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LogLines:
    """One timestamped line per step, for logs.

    Args:
        command (`str`): the command's name, first on every line (``tune``).
        names (`Dict[str, str]`, *optional*): how each stage is written.
        stream (`TextIO`, defaults to stderr): where the lines go; flushed per line.
        every (`float`, defaults to `LOG_EVERY_SECONDS`): least seconds between two
            lines of a stage whose detail did not change.
        clock, now: injectable for tests (``time.monotonic``, ``datetime.now``).
    """

    def __init__(self, command: str, names: Optional[Dict[str, str]] = None, *,
                 stream: Optional[TextIO] = None, every: float = LOG_EVERY_SECONDS,
                 clock=time.monotonic, now=datetime.now):
        self.command, self.names, self.every = command, names or {}, every
        self.stream = stream if stream is not None else sys.stderr
        self.clock, self.now = clock, now
        self._started: Dict[str, float] = {}
        self._last: Dict[str, tuple] = {}

    def __call__(self, stage: str, done: int, total: int, detail: str) -> None:
        now = self.clock()
        started = self._started.setdefault(stage, now)
        last_time, last_detail, last_done = self._last.get(stage, (None, None, None))
        if done == last_done and detail == last_detail:
            return
        if (last_time is not None and detail == last_detail and done < total
                and now - last_time < self.every):
            return
        self._last[stage] = (now, detail, done)
        elapsed = now - started
        parts = [self.now().strftime("%Y-%m-%d %H:%M:%S"), self.command,
                 self.names.get(stage, stage), f"{done}/{total}"]
        if detail:
            parts.append(detail)
        timing = f"{duration(elapsed)} elapsed"
        if 0 < done < total and elapsed >= 1:
            timing += f", about {duration(elapsed / done * (total - done))} left"
        parts.append(timing)
        self.stream.write(" | ".join(parts) + "\n")
        self.stream.flush()


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    """Whether ``stream`` (stderr by default) is a terminal a live bar can redraw."""
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress_reporter(command: str, names: Optional[Dict[str, str]] = None, *,
                      console=None, stream: Optional[TextIO] = None) -> Iterator[Report]:
    """A :data:`Report` callback for the duration of the ``with`` block: rich bars (one
    per stage, with what is being done and the time spent) on a terminal, else
    :class:`LogLines`.

    Args:
        command (`str`): the command's name, for the log lines.
        names (`Dict[str, str]`, *optional*): how each stage is written.
        console (`rich.console.Console`, *optional*): where the command prints; the
            bars or lines go there too (``tune > log`` gets a line per model).
        stream (`TextIO`, defaults to the console's file, else stderr): where the
            log lines go when it is no terminal.
    """
    if stream is None:
        stream = console.file if console is not None else sys.stderr
    terminal = console.is_terminal if console is not None else is_terminal(stream)
    if not terminal:
        yield LogLines(command, names, stream=stream)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    names = names or {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console) as bars:
        jobs: Dict[str, int] = {}

        def report(stage: str, done: int, total: int, detail: str) -> None:
            if stage not in jobs:
                jobs[stage] = bars.add_task(names.get(stage, stage), total=total, detail="")
            bars.update(jobs[stage], completed=done, total=total, detail=detail)

        yield report


__all__ = ["LOG_EVERY_SECONDS", "LogLines", "Report", "duration", "is_terminal", "progress_reporter",
           "silent"]
