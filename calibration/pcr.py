"""PCR's progressive calibration (Tang et al., arXiv 2311.06322, Sec. 3.2): C_QC along the *quantized* model's
own trajectories, so later steps are calibrated on inputs that carry the accumulated quantization error.

The T steps are split into K contiguous stages from x_T to x_0 (`pcr_stages`; the paper's per-step progression is
K = T, which costs T quantizations). Stage 1's inputs come from the FP trajectories. After stage k, the model is
quantized (`pqcad_export.quantize.quantize_model`, bits `pcr_bits`, method `pcr_method`, the `pcr_preset`
ReconConfig plus `pcr_recon` overrides) on all rows collected so far, and that quantized model then drives the
same seeded trajectories from x_T through stage k+1; stage k+1's inputs are the latents it produces. Which
trajectories are kept at each step is the `uniform` strategy's choice (every_k, n_per_step, seed), so stage 1
equals the uniform set row for row. The quantization of the final stage is the pipeline's own `quant` stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from pqcad_export.errors import PqcadError, UsageError
from pqcad_export.model_io import LoadedModel
from pqcad_export.sampling import TorchUNet, UNetFn
from pqcad_export.progress import progress_bar

from .config import CalibConfig
from .storage import ShardWriter
from .strategies import Strategy, StrategyName, Uniform, get_strategy, register_strategy
from .trajectories import cqc_meta, model_meta, resolve_cond, run_trajectories, step_rows


@register_strategy
class PCR(Strategy):
    """Progressive calibration: uniform per-step counts; its own collector (`collect_pcr`, reached through
    `Strategy.collect`) decides where the inputs come from (FP for stage 1, the model quantized on earlier stages
    afterwards)."""

    name = StrategyName.PCR.value

    def counts(self, steps: int) -> np.ndarray:
        return Uniform(self.cfg).counts(steps)

    def collect(self, model: LoadedModel, out_dir: str | Path, device: str | torch.device,
                cond: Optional[torch.Tensor], quiet: bool) -> dict[str, Any]:
        return collect_pcr(model, self.cfg, out_dir, device, cond, quiet)

    def describe(self) -> dict:
        return {"name": self.name, "n_per_step": self.cfg.n_per_step, "every_k": self.cfg.every_k,
                "stages": self.cfg.pcr_stages, "bits": getattr(self.cfg.pcr_bits, "name", None),
                "method": self.cfg.pcr_method,
                "preset": self.cfg.pcr_preset, "recon_overrides": dict(self.cfg.pcr_recon or {})}


def stage_bounds(steps: int, stages: int) -> list[tuple[int, int]]:
    """[start, end) step ranges of K contiguous stages from x_T (step 0) to x_0 (step T-1)."""
    if not 1 <= stages <= steps:
        raise UsageError(f"--pcr-stages must be in [1, {steps}] (the number of steps), got {stages}")
    edges = np.linspace(0, steps, stages + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _shuffled(rows: list[dict[str, torch.Tensor]], seed: int) -> dict[str, torch.Tensor]:
    allr = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    perm = torch.randperm(allr["sample"].shape[0], generator=torch.Generator().manual_seed(seed))
    return {k: v[perm] for k, v in allr.items()}


def collect_pcr(model: LoadedModel, cfg: CalibConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                cond: Optional[torch.Tensor] = None, quiet: bool = True,
                on_stage_model: Optional[Callable[[int, Any], None]] = None) -> dict[str, Any]:
    """Collect C_QC progressively into `out_dir` (a set directory); returns the manifest.

    on_stage_model(k, quantized_model) is called with the model that drives stage k+1 (k = 1..K-1)."""
    from pqcad_export.quantize import ReconConfig, quantize_model  # lazy: quantize imports torch-heavy modules

    cfg.validate()
    if cfg.strategy != StrategyName.PCR:
        raise UsageError(f"collect_pcr needs strategy pcr, got {cfg.strategy}")
    pcr = cfg.pcr()
    bits = pcr.bits
    T = cfg.steps
    bounds = stage_bounds(T, pcr.stages)
    rcfg = ReconConfig.preset(pcr.preset.value, **{"progress": False, "seed": cfg.seed, **pcr.recon})
    strat = get_strategy(cfg)
    counts = strat.counts(T)
    n_traj = strat.n_trajectories(T)
    if counts.max() > n_traj:
        raise UsageError(f"pcr keeps {int(counts.max())} samples at one step but only {n_traj} trajectories run")
    cond, provided = resolve_cond(model, cfg, n_traj, cond)
    rng = np.random.default_rng([int(cfg.seed), 0xC0C])  # the same draws as `uniform`: stage 1 == uniform
    keep = strat.keep_mask(counts, n_traj, rng)

    writer = ShardWriter(out_dir, "c_qc", cfg.shard_size)
    t0 = time.perf_counter()
    model.unet.to(device)
    collected: list[dict[str, torch.Tensor]] = []
    driver: UNetFn = TorchUNet(model.unet)
    pos = {int(t): j for j, t in enumerate(model_meta(model, T)["timesteps"])}  # timestep -> step index
    log: list[dict[str, Any]] = []
    for k, (a, b) in enumerate(bounds, start=1):
        stage_rows: list[dict[str, torch.Tensor]] = []
        ts = time.perf_counter()

        def on_call(i, t, x, c, out, ids, _a=a, _b=b):
            if _a <= i < _b:
                if not torch.isfinite(out).all():
                    raise PqcadError(f"PCR stage {k}: the {'FP' if k == 1 else 'quantized'} model produced "
                                     f"non-finite outputs at step {i}")
                m = keep[i, ids]
                if m.any():
                    stage_rows.append({kk: v.cpu() for kk, v in step_rows(i, t, x, c, ids, m).items()})

        def fn(x, t, c=None, _drv=driver, _b=b):
            # steps after this stage are not needed: skip the UNet (zeros keep the DDIM update finite)
            return _drv(x, t, c) if pos[int(t.reshape(-1)[0])] < _b else torch.zeros_like(x)

        with progress_bar(f"C_QC (pcr): stage {k}/{len(bounds)}, steps {a}-{b - 1}", n_traj * T, quiet) as adv:
            run_trajectories(model, n_traj, T, cfg.eta, cfg.seed, cfg.batch_size, device, cond, on_call,
                             advance=adv, unet_fn=fn)
        for r in stage_rows:
            writer.add(r)
        collected.extend(stage_rows)
        n_rows = sum(int(r["sample"].shape[0]) for r in stage_rows)
        log.append({"stage": k, "steps": [a, b - 1], "rows": n_rows,
                    "driver": "fp" if k == 1 else f"quantized {bits.name} on stages 1-{k - 1}",
                    "collect_seconds": round(time.perf_counter() - ts, 3)})
        if k == len(bounds):
            break
        if not collected:
            raise PqcadError(f"PCR: no calibration rows in stages 1-{k}; lower --every-k or use fewer stages")
        tq = time.perf_counter()
        calib = _shuffled(collected, cfg.seed + k)
        keys = ["sample", "timestep"] + (["encoder_hidden_states"] if "encoder_hidden_states" in calib else [])
        qm = quantize_model(model, [{kk: calib[kk] for kk in keys}], bits, pcr.method, rcfg, device)
        qm.unet.eval()
        log[-1]["quant_seconds"] = round(time.perf_counter() - tq, 3)
        log[-1]["quant_rows"] = int(calib["sample"].shape[0])
        if on_stage_model is not None:
            on_stage_model(k, qm)
        driver = TorchUNet(qm.unet)

    return writer.close(cqc_meta(model, cfg, strat.describe(), n_traj, cond, provided, time.perf_counter() - t0,
                                 pcr={"stages": log, "bounds": [[a, b - 1] for a, b in bounds]}))
