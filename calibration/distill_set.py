"""C_DC: the distillation calibration set (PQCAD paper, Alg. 1 lines 8-9).

Time-conditioned uniform sampling from the FP teacher: run stochastic trajectories (fresh noise every step: DDIM
with eta=1, i.e. DDPM-like ancestral sampling, so the kept z_t follow the FP marginal p(z_t) rather than one
deterministic ODE path), and at every `dc_stride`-th teacher step (every even step: exactly the 50-step student's
grid, since the schedule uses trailing spacing) keep one sample chosen uniformly at random among the
trajectories. Each row stores z_t with its step, and what the FP teacher predicts from it (the targets the
student's outputs are compared with during CAD).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pqcad_export.errors import PqcadError, UsageError
from pqcad_export.model_io import LoadedModel
from pqcad_export.sampling import make_scheduler
from pqcad_export.progress import progress_bar

from .config import CalibConfig
from .storage import ShardWriter
from .trajectories import conditioning_meta, model_meta, resolve_cond, run_trajectories, step_rows

DC_FIELDS = {
    "sample": "z_t: the noisy input at this teacher step, drawn from a stochastic (eta=dc_eta) FP trajectory",
    "x0_pred": "FP teacher's predicted clean sample x0 from z_t, as the DDIM step uses it (clipped to "
               "+-clip_sample_range when the scheduler has clip_sample)",
    "model_output": "raw FP UNet output at (z_t, t): eps for prediction_type=epsilon",
    "student_step_index": "index of t in the student's grid (teacher step_index // dc_stride)",
}


def dc_counts(cfg: CalibConfig) -> dict[int, int]:
    """Rows per kept teacher step: |C_DC| spread evenly over steps 0, stride, 2*stride, ... (one each by default)."""
    kept = list(range(0, cfg.steps, cfg.dc_stride))
    size = cfg.dc_size if cfg.dc_size is not None else len(kept)
    base, rem = divmod(int(size), len(kept))
    counts = np.full(len(kept), base, dtype=np.int64)
    counts[(np.arange(rem) * len(kept)) // max(rem, 1)] += 1  # extras evenly spaced over the trajectory
    return {s: int(c) for s, c in zip(kept, counts) if c > 0}


def predicted_x0(scheduler_config: dict[str, Any], steps: int, x: torch.Tensor, t: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
    """x0 from the UNet output, as diffusers' DDIMScheduler.step computes it (DDIM paper eq. 12)."""
    sched = make_scheduler(scheduler_config, steps)
    a = sched.alphas_cumprod.to(x.device, torch.float32)[t.long()].view(-1, *([1] * (x.dim() - 1)))
    ptype = sched.config.prediction_type
    if ptype == "epsilon":
        x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
    elif ptype == "sample":
        x0 = out
    elif ptype == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
    else:
        raise PqcadError(f"unsupported scheduler prediction_type {ptype!r}")
    if sched.config.clip_sample:
        r = float(sched.config.clip_sample_range)
        x0 = x0.clamp(-r, r)
    return x0


def collect_cdc(model: LoadedModel, cfg: CalibConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                cond: Optional[torch.Tensor] = None, quiet: bool = True) -> dict[str, Any]:
    """Collect C_DC into `out_dir` (a set directory) and return its manifest.

    Trajectories use seed `cfg.seed + 1` so C_DC never shares starting noise with C_QC (seed `cfg.seed`).
    """
    cfg.validate()
    T, n_traj = cfg.steps, cfg.dc_trajectories
    counts = dc_counts(cfg)
    if max(counts.values()) > n_traj:
        raise UsageError(f"C_DC keeps {max(counts.values())} samples per step but only {n_traj} stochastic "
                         f"trajectories are run; raise --dc-trajectories or lower --dc-size")
    cond, provided = resolve_cond(model, cfg, n_traj, cond)
    rng = np.random.default_rng([int(cfg.seed), 0xDC])
    keep = np.zeros((T, n_traj), dtype=bool)
    for s, n in counts.items():
        keep[s, rng.choice(n_traj, size=n, replace=False)] = True
    writer = ShardWriter(out_dir, "c_dc", cfg.shard_size, DC_FIELDS)
    t0 = time.perf_counter()
    model.unet.to(device)
    sched_cfg = model.scheduler_config

    def on_call(i, t, x, c, out, ids):
        k = keep[i, ids]
        if not k.any():
            return
        rows = step_rows(i, t, x, c, ids, k)
        idx = torch.from_numpy(np.flatnonzero(k)).to(x.device)
        o = out.index_select(0, idx).float()
        rows["x0_pred"] = predicted_x0(sched_cfg, T, rows["sample"], rows["timestep"].to(x.device), o)
        rows["model_output"] = o
        rows["student_step_index"] = rows["step_index"] // cfg.dc_stride
        writer.add(rows)

    with progress_bar("C_DC: stochastic FP trajectories", n_traj * T, quiet) as adv:
        run_trajectories(model, n_traj, T, cfg.dc_eta, cfg.seed + 1, cfg.batch_size, device, cond, on_call,
                         advance=adv)
    meta = model_meta(model, T)
    meta.update({"strategy": {"name": "time_conditioned_uniform", "stride": cfg.dc_stride,
                              "student_steps": len(range(0, T, cfg.dc_stride)),
                              "student_timesteps": meta["timesteps"][::cfg.dc_stride]},
                 "seed": cfg.seed, "trajectory_seed": cfg.seed + 1, "n_trajectories": n_traj, "eta": cfg.dc_eta,
                 "targets": {"sample": "z_t (student input)", "x0_pred": "teacher x0 prediction",
                             "model_output": "teacher UNet output"},
                 "conditioning": conditioning_meta(model, cond, provided, cfg), "config": cfg.cdc_dict(),
                 "collect_seconds": round(time.perf_counter() - t0, 3)})
    return writer.close(meta)
