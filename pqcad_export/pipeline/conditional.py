"""What a conditional UNet's run adds to the export stage: the export / parity configs with the conditioning's
sequence length (the calibration trajectories' rows: calibration.stage.cond_rows)."""

from __future__ import annotations


def export_configs(cond):
    """Conditional UNets: export (and check parity) with the conditioning's sequence length."""
    if cond is None:
        return None, None
    from ..export.onnx import ExportConfig
    from ..export.parity import ParityConfig

    return ExportConfig(cond_seq_len=cond.tokens), ParityConfig(cond_seq_len=cond.tokens)
