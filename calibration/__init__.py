"""Calibration data for PQ (C_QC) and CAD (C_DC): collection from the FP model, selection strategies and the
on-disk format (safetensors shards + manifest.json). Never imports the CLI."""

from .collect import calibrate, collect_cqc, make_conditioning, run_trajectories
from .config import CalibConfig
from .distill_set import collect_cdc, dc_counts, predicted_x0
from .storage import (FORMAT_VERSION, CalibSet, ShardWriter, is_complete, open_set, read_manifest,
                      resolve_set_dir, write_set)
from .strategies import STRATEGIES, Strategy, get_strategy, register_strategy, tdac_scores
from .pcr import collect_pcr  # noqa: E402  (registers strategy "pcr")

__all__ = [
    "CalibConfig", "CalibSet", "FORMAT_VERSION", "STRATEGIES", "ShardWriter", "Strategy", "calibrate",
    "collect_cdc", "collect_cqc", "collect_pcr", "dc_counts", "get_strategy", "is_complete", "make_conditioning", "open_set",
    "predicted_x0", "read_manifest", "register_strategy", "resolve_set_dir", "run_trajectories", "tdac_scores",
    "write_set",
]
