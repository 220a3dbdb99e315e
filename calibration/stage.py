"""The calibrate stage, once: FP model (+ its conditioning) -> C_QC and C_DC sets. `pqcad-export calibrate`,
`build` and research all call `run_calibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from pqcad_export.model_io import LoadedModel

from .collect import calibrate
from .config import CalibConfig
from .strategies import get_strategy


def cond_rows(cond, cfg: CalibConfig) -> Optional[torch.Tensor]:
    """A conditional model's conditioning rows for every calibration trajectory (C_QC and C_DC), row i for
    trajectory i; None for an unconditional model."""
    if cond is None:
        return None
    return cond.rows(max(get_strategy(cfg).n_trajectories(cfg.steps), cfg.dc_trajectories))


def run_calibrate(model: LoadedModel, cfg: CalibConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                  quiet: bool = True) -> dict[str, Optional[dict[str, Any]]]:
    """Collect C_QC into out_dir/c_qc and (cfg.with_dc) C_DC into out_dir/c_dc from `model`, conditioned on
    `model.cond` when it has one (conditioning.resolve_conditioning); returns both manifests (None: not
    collected)."""
    return calibrate(model, cfg, out_dir, device, cond=cond_rows(getattr(model, "cond", None), cfg), quiet=quiet)
