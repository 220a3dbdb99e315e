"""SIGTERM ends a run like Ctrl-C, and long loops stop only between two steps.

`terminate_as_interrupt()` makes SIGTERM raise KeyboardInterrupt (the CLI then prints one line and exits 143,
checkpoints kept). `deferred()` is for loops whose state must stay consistent (CAD): SIGINT/SIGTERM only set a
flag that the loop checks after each step (checkpoint, then raise); a second signal interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class Terminated(KeyboardInterrupt):
    """KeyboardInterrupt raised by SIGTERM (the CLI exits 143 instead of 130)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def terminate_as_interrupt() -> Callable[[], None]:
    """Install the SIGTERM -> Terminated handler (main thread only; a no-op elsewhere); returns a function that
    puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    return lambda: signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


class _Flag:
    def __init__(self) -> None:
        self.signum = 0

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def raise_if_requested(self) -> None:
        if self.signum == signal.SIGTERM:
            raise Terminated()
        if self.signum:
            raise KeyboardInterrupt()


@contextmanager
def deferred() -> Iterator[_Flag]:
    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.signum:  # second signal: stop now
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        flag.signum = signum

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
