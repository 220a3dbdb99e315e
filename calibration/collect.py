"""C_QC: time-step-aware calibration inputs (z_t, t[, cond]) from the FP model's DDIM trajectories.

The FP teacher is run for `n_trajectories` seeded trajectories of T DDIM steps; a wrapper around the UNet sees
every call (step, t, z_t, cond, output) and the strategy decides which trajectories' z_t are kept at each step.
Rows stream into safetensors shards as they are produced (except for data-dependent strategies such as TDAC,
which need all candidates of a step before choosing; they hold candidates of the kept steps in memory). A strategy
with its own collector (PCR) takes over through `Strategy.collect`. The trajectory machinery is trajectories.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pqcad_export.errors import UsageError
from pqcad_export.model_io import LoadedModel
from pqcad_export.progress import progress_bar

from .config import CalibConfig
from .distill_set import collect_cdc
from .storage import ShardWriter
from .strategies import get_strategy
from .trajectories import cqc_meta, resolve_cond, run_trajectories, step_rows


def collect_cqc(model: LoadedModel, cfg: CalibConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                cond: Optional[torch.Tensor] = None, quiet: bool = True) -> dict[str, Any]:
    """Collect C_QC into `out_dir` (a set directory) and return its manifest.

    For each step t the strategy's n_t inputs are taken from distinct trajectories (chosen with `cfg.seed`).
    """
    cfg.validate()
    strat = get_strategy(cfg)
    own = strat.collect(model, out_dir, device, cond, quiet)  # a strategy with its own collector (PCR)
    if own is not None:
        return own
    T = cfg.steps
    counts = strat.counts(T)
    n_traj = strat.n_trajectories(T)
    if counts.max() > n_traj:
        raise UsageError(f"strategy {cfg.strategy} keeps up to {int(counts.max())} samples at one step but only "
                         f"{n_traj} trajectories are run; raise n_trajectories")
    cond, provided = resolve_cond(model, cfg, n_traj, cond)
    rng = np.random.default_rng([int(cfg.seed), 0xC0C])
    writer = ShardWriter(out_dir, "c_qc", cfg.shard_size)
    t0 = time.perf_counter()
    model.unet.to(device)

    if not strat.needs_features:
        keep = strat.keep_mask(counts, n_traj, rng)

        def on_call(i, t, x, c, out, ids):
            k = keep[i, ids]
            if k.any():
                writer.add(step_rows(i, t, x, c, ids, k))

        with progress_bar("C_QC: FP trajectories", n_traj * T, quiet) as adv:
            run_trajectories(model, n_traj, T, cfg.eta, cfg.seed, cfg.batch_size, device, cond, on_call,
                             advance=adv)
    else:
        # Data-dependent selection: keep every candidate of the kept steps (z_t + small features), then choose.
        feats_now: dict[str, Any] = {}
        cand: dict[int, list[dict[str, torch.Tensor]]] = {int(i): [] for i in np.flatnonzero(counts)}

        def on_features(mid_out: torch.Tensor) -> None:
            feats_now["f"] = mid_out

        def on_call(i, t, x, c, out, ids):
            if i in cand:
                rows = step_rows(i, t, x, c, ids, np.ones(len(ids), dtype=bool))
                rows = {k: v.cpu() for k, v in rows.items()}
                rows.update({f"_f_{k}": v for k, v in strat.featurize(feats_now["f"]).items()})
                cand[i].append(rows)

        with progress_bar("C_QC: FP trajectories", n_traj * T, quiet) as adv:
            run_trajectories(model, n_traj, T, cfg.eta, cfg.seed, cfg.batch_size, device, cond, on_call,
                             feature_module=strat.feature_module(model.unet), on_features=on_features,
                             advance=adv)
        for i, parts in cand.items():
            allr = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            feats = {k[3:]: v for k, v in allr.items() if k.startswith("_f_")}
            rows = {k: v for k, v in allr.items() if not k.startswith("_f_")}
            sel = strat.select(i, int(counts[i]), rows["trajectory"].numpy(), feats, rng)
            idx = torch.from_numpy(np.asarray(sel, dtype=np.int64))
            writer.add({k: v.index_select(0, idx) for k, v in rows.items()})
            cand[i] = []

    return writer.close(cqc_meta(model, cfg, strat.describe(), n_traj, cond, provided, time.perf_counter() - t0))


def calibrate(model: LoadedModel, cfg: CalibConfig, out_dir: str | Path, device: str | torch.device = "cpu",
              cond: Optional[torch.Tensor] = None, quiet: bool = True) -> dict[str, Optional[dict[str, Any]]]:
    """Collect C_QC into `out_dir/c_qc` and (cfg.with_dc) C_DC into `out_dir/c_dc`; return both manifests."""
    out = Path(out_dir)
    result: dict[str, Optional[dict[str, Any]]] = {"c_qc": collect_cqc(model, cfg, out / "c_qc", device, cond, quiet)}
    result["c_dc"] = collect_cdc(model, cfg, out / "c_dc", device, cond, quiet) if cfg.with_dc else None
    return result
