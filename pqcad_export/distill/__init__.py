"""Calibration-Assisted Distillation (CAD, arXiv 2506.16776 Alg. 4 / Eq. (8)): a quantized 50-step student from
the quantized 100-step teacher. `run_distill(...)` (stage.py) is the stage the build pipeline, `pqcad-export
distill` and research call; `distill_fp(...)` is the FP Distill-only baseline of the paper's tables (the same
distillation, unquantized).

Names load on first use (PEP 562), so the CLI can read the choice sets (distill.choices) without importing torch
and POT."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    ".cad": ("CdcBank", "CadResult", "distill", "distill_fp", "load_cdc", "run_cad", "training_images"),
    ".config": ("CadConfig",),
    ".stage": ("Distilled", "run_distill"),
    ".losses": ("LOSSES", "calibration_loss", "cosine_loss", "em_distance", "js_divergence", "kl_divergence",
                "sliced_wasserstein"),
    ".student": ("freeze_student", "prepare_student"),
    ".targets": ("Schedule", "distillation_target", "prev_timestep", "student_grid", "x_from_two_steps"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(mod, __name__), name)
