"""The product's progress bars, in one place: `Progress` (rich on a TTY, else a plain line every ~10%, or a
callback; works where `rich` is missing), `progress_bar` (one rich bar of a calibration stage) and `StageBars`
(several named rich bars of the compare stage)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Union

ProgressArg = Union[bool, Callable[[int], None], None]


class Progress:
    """Context manager with advance(k). rich bar on a TTY when importable, else a plain line every ~10%."""

    def __init__(self, total: int, desc: str, enabled: ProgressArg = True):
        self.total, self.desc = int(total), desc
        self._callback = enabled if callable(enabled) else None
        self._enabled = bool(enabled) and self._callback is None
        self._rich = None
        self._done = 0
        self._next_print = 0.0
        self._t0 = time.perf_counter()

    def __enter__(self) -> "Progress":
        if self._enabled and sys.stderr.isatty():
            try:
                from rich.progress import Progress as RichProgress  # optional dependency
            except ImportError:
                pass
            else:
                self._rich = RichProgress(transient=False)
                self._rich.__enter__()
                self._task = self._rich.add_task(self.desc, total=self.total)
        return self

    def advance(self, k: int) -> None:
        self._done += int(k)
        if self._callback is not None:
            self._callback(int(k))
        elif self._rich is not None:
            self._rich.update(self._task, advance=int(k))
        elif self._enabled and (self._done >= self._next_print or self._done >= self.total):
            rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
            print(f"{self.desc}: {self._done}/{self.total} ({rate:.1f}/s)", file=sys.stderr, flush=True)
            self._next_print = self._done + max(self.total / 10, 1)

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)


@contextmanager
def progress_bar(description: str, total: int, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over `total` units; yields advance(k). quiet=True shows nothing."""
    from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    from rich.progress import Progress as RichProgress

    with RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), disable=quiet) as prog:
        task = prog.add_task(description, total=total)
        yield lambda k: prog.advance(task, k)


class StageBars:
    """Several rich bars under one `prefix` (one per task), or nothing when quiet."""

    def __init__(self, quiet: bool, prefix: str = "compare"):
        self.quiet, self.prefix = quiet, prefix
        self.prog = None

    def __enter__(self) -> "StageBars":
        if not self.quiet:
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.prog = RichProgress(TextColumn(self.prefix + ": {task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn())
            self.prog.start()
        return self

    def task(self, desc: str, total: int) -> Callable[[int], None]:
        if self.prog is None:
            return lambda k: None
        tid = self.prog.add_task(desc, total=total)
        return lambda k: self.prog.advance(tid, k)

    def __exit__(self, *exc) -> None:
        if self.prog is not None:
            self.prog.stop()
