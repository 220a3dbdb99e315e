"""How often CAD checkpoints: every `checkpoint_every` updates, but at least four times per run, so a short run
(the quick preset's 150 updates, a test's 4) is resumable too."""

from __future__ import annotations

import math

from .config import CadConfig

MIN_CHECKPOINTS = 4


def checkpoint_interval(cfg: CadConfig) -> int:
    return max(1, min(cfg.checkpoint_every, math.ceil(cfg.iters / MIN_CHECKPOINTS)))
