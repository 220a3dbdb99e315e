"""One build per run directory at a time: an exclusive flock on RUN/.lock (holding the owner's pid for the
message). The kernel drops the lock when its process dies, even by kill -9, so a killed run never leaves a stuck
lock; a leftover file without a live lock is simply taken over."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional

from ..errors import PqcadError

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, root: str | Path):
        self.path = Path(root) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no flock (Windows): run unlocked rather than not at all
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise PqcadError(f"run directory {self.path.parent} is in use by another build ({owner}); wait for it "
                             f"to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
