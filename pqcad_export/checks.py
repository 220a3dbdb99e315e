"""Input checks every command runs before its first stage, so bad input costs seconds, not a half-built run:
one `UsageError` line each (exit 2), nothing written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import UsageError


def positive(flag: str, value: Optional[int | float], allow_zero: bool = False) -> None:
    """`--samples 0` or `--samples -5`: refuse (None = the preset's value, always fine)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def in_range(flag: str, value: Optional[float], lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise UsageError(f"{flag} must be in [{lo:g}, {hi:g}], got {value:g}")


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """A directory we may create or write into: not an existing file, and its nearest existing ancestor is a
    writable directory (checked without writing anything)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {p} exists and is not a directory; give a directory path")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{flag} {p}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {p}: {probe} is not writable")
    return p


def writable_file(path: str | Path, flag: str = "--out") -> Path:
    """A file we may (over)write: not a directory, and its directory is writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a directory; give a file path")
    writable_dir(p.parent, flag)
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{flag} {p} is not writable")
    return p


def device(name: str) -> None:
    """An unusable --device (cuda without a GPU, a typo) in one line."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"unusable --device '{name}': {str(exc).splitlines()[0]}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but CUDA is not available")
