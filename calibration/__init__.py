"""Calibration data for PQ (C_QC) and CAD (C_DC): collection from the FP model, selection strategies and the
on-disk format (safetensors shards + manifest.json). Never imports the CLI.

Modules, in import order (each imports only those above it): storage, strategies, config, trajectories,
distill_set (C_DC), pcr (registers strategy "pcr"), collect (C_QC and `calibrate`), stage (`run_calibrate`, the
stage every caller runs).
"""

from .config import CalibConfig, PcrConfig
from .distill_set import collect_cdc, dc_counts, predicted_x0
from .pcr import collect_pcr
from .collect import calibrate, collect_cqc
from .stage import cond_rows, run_calibrate
from .storage import (FORMAT_VERSION, CalibSet, ShardWriter, is_complete, open_set, read_manifest,
                      resolve_set_dir, write_set)
from .strategies import (STRATEGIES, Strategy, StrategyName, get_strategy, register_strategy, strategy_choices,
                         tdac_scores)
from .trajectories import make_conditioning, run_trajectories

__all__ = [
    "CalibConfig", "CalibSet", "FORMAT_VERSION", "PcrConfig", "STRATEGIES", "ShardWriter", "Strategy",
    "StrategyName", "calibrate", "collect_cdc", "cond_rows", "collect_cqc", "collect_pcr", "dc_counts", "get_strategy",
    "is_complete", "make_conditioning", "open_set", "predicted_x0", "read_manifest", "register_strategy",
    "resolve_set_dir", "run_calibrate", "run_trajectories", "strategy_choices", "tdac_scores", "write_set",
]
