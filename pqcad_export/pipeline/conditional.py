"""What a conditional UNet's run adds to the stages: conditioning rows for the calibration trajectories, and the
export / parity configs with the conditioning's sequence length."""

from __future__ import annotations

from typing import Optional

import torch


def calib_cond_rows(cond, ccfg) -> Optional[torch.Tensor]:
    """The conditioning rows of every calibration trajectory (C_QC and C_DC), row i for trajectory i."""
    if cond is None:
        return None
    from calibration.strategies import get_strategy

    return cond.rows(max(get_strategy(ccfg).n_trajectories(ccfg.steps), ccfg.dc_trajectories))


def export_configs(cond):
    """Conditional UNets: export (and check parity) with the conditioning's sequence length."""
    if cond is None:
        return None, None
    from ..export.onnx import ExportConfig
    from ..export.parity import ParityConfig

    return ExportConfig(cond_seq_len=cond.tokens), ParityConfig(cond_seq_len=cond.tokens)
