"""C_QC: time-step-aware calibration inputs (z_t, t[, cond]) from the FP model's DDIM trajectories.

The FP teacher is run for `n_trajectories` seeded trajectories of T DDIM steps; a wrapper around the UNet sees
every call (step, t, z_t, cond, output) and the strategy decides which trajectories' z_t are kept at each step.
Rows stream into safetensors shards as they are produced (except for data-dependent strategies such as TDAC,
which need all candidates of a step before choosing; they hold candidates of the kept steps in memory).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from pqcad_export.errors import PqcadError, UsageError
from pqcad_export.model_io import LoadedModel
from pqcad_export.sampling import SamplerConfig, TorchUNet, UNetFn, ddim_sample, ddim_timesteps

from .config import CalibConfig
from .storage import ShardWriter
from .strategies import get_strategy

# on_call(step_index, t[B], z_t[B,...], cond[B,...] | None, model_output[B,...], trajectory_ids[B])
CallHook = Callable[[int, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor, np.ndarray], None]


@contextmanager
def progress_bar(description: str, total: int, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over `total` units; yields advance(k). quiet=True shows nothing."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), disable=quiet) as prog:
        task = prog.add_task(description, total=total)
        yield lambda k: prog.advance(task, k)


def make_conditioning(model: LoadedModel, n: int, cfg: CalibConfig) -> Optional[torch.Tensor]:
    """Conditioning for conditional UNets that come without their text encoder: seeded N(0,1) tokens
    [n, cond_tokens, cross_attention_dim]; None for unconditional UNets. Pass real embeddings instead
    (`cond=` of the collect functions) when you have them."""
    if not model.is_conditional:
        return None
    dim = model.unet.config.cross_attention_dim
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    g = torch.Generator().manual_seed(int(cfg.seed) * 7919 + 17)
    return torch.randn((n, cfg.cond_tokens, int(dim)), generator=g)


def conditioning_meta(model: LoadedModel, cond: Optional[torch.Tensor], provided: bool, cfg: CalibConfig):
    if cond is None:
        return None
    if provided:
        return {"source": "provided", "shape": list(cond.shape[1:])}
    return {"source": "random_normal", "tokens": cfg.cond_tokens, "dim": int(cond.shape[-1]),
            "note": "no text encoder available: seeded N(0,1) token embeddings"}


def check_cond(cond: Optional[torch.Tensor], model: LoadedModel, n: int) -> None:
    if model.is_conditional and cond is None:
        raise UsageError("a conditional UNet needs conditioning embeddings")
    if cond is not None and cond.shape[0] < n:
        raise UsageError(f"conditioning has {cond.shape[0]} rows but {n} trajectories are run")


def run_trajectories(model: LoadedModel, n: int, steps: int, eta: float, seed: int, batch_size: int,
                     device: str | torch.device, cond: Optional[torch.Tensor], on_call: CallHook,
                     feature_module: Optional[torch.nn.Module] = None,
                     on_features: Optional[Callable[[torch.Tensor], None]] = None,
                     advance: Optional[Callable[[int], None]] = None,
                     unet_fn: Optional[UNetFn] = None) -> torch.Tensor:
    """Run n seeded FP DDIM trajectories through `pqcad_export.sampling.ddim_sample`, calling `on_call` after
    every UNet call with the global trajectory ids of the batch. Returns the final images.

    unet_fn replaces the FP UNet as the trajectory driver (progressive calibration, e.g. PCR, runs the
    partially quantized model here); `model` still provides the schedule and sample shape."""
    state = {"step": 0, "offset": 0, "next": 0}
    base = unet_fn if unet_fn is not None else TorchUNet(model.unet)

    def on_step(i: int, t: torch.Tensor, x: torch.Tensor, c: Optional[torch.Tensor]) -> None:
        if i == 0:  # ddim_sample runs batches one after another, each from step 0
            state["offset"], state["next"] = state["next"], state["next"] + x.shape[0]
        state["step"] = i

    def fn(x: torch.Tensor, t: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = base(x, t, c)
        ids = np.arange(state["offset"], state["offset"] + x.shape[0])
        on_call(state["step"], t, x, c, out, ids)
        if advance is not None:
            advance(x.shape[0])
        return out

    handle = None
    if feature_module is not None and on_features is not None:
        def hook(_m, _inp, output):
            on_features(output[0] if isinstance(output, (tuple, list)) else output)
        handle = feature_module.register_forward_hook(hook)
    try:
        return ddim_sample(fn, model.scheduler_config, model.sample_shape, n,
                           SamplerConfig(steps=steps, eta=eta, batch_size=batch_size, seed=seed),
                           device=device, cond=cond, on_step=on_step)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PqcadError(f"FP trajectory failed on {device}: {msg}") from None
    finally:
        if handle is not None:
            handle.remove()


def _rows(step: int, t: torch.Tensor, x: torch.Tensor, c: Optional[torch.Tensor], ids: np.ndarray,
          keep: np.ndarray) -> dict[str, torch.Tensor]:
    idx = torch.from_numpy(np.flatnonzero(keep)).to(x.device)
    rows = {"sample": x.index_select(0, idx).float(),
            "timestep": t.index_select(0, idx).long(),
            "step_index": torch.full((len(idx),), step, dtype=torch.int64),
            "trajectory": torch.from_numpy(ids[keep].astype(np.int64))}
    if c is not None:
        rows["encoder_hidden_states"] = c.index_select(0, idx).float()
    return rows


def model_meta(model: LoadedModel, steps: int) -> dict[str, Any]:
    return {"fingerprint": model.fingerprint, "model_path": str(model.path), "model_class": model.class_name,
            "sample_shape": list(model.sample_shape), "steps": steps,
            "timesteps": [int(t) for t in ddim_timesteps(model.scheduler_config, steps)],
            "scheduler_config": model.scheduler_config}


def collect_cqc(model: LoadedModel, cfg: CalibConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                cond: Optional[torch.Tensor] = None, quiet: bool = True) -> dict[str, Any]:
    """Collect C_QC into `out_dir` (a set directory) and return its manifest.

    For each step t the strategy's n_t inputs are taken from distinct trajectories (chosen with `cfg.seed`).
    """
    cfg.validate()
    if cfg.strategy == "pcr":  # progressive: quantizes between stages (calibration/pcr.py)
        from .pcr import collect_pcr

        return collect_pcr(model, cfg, out_dir, device, cond, quiet)
    strat = get_strategy(cfg)
    T = cfg.steps
    counts = strat.counts(T)
    n_traj = strat.n_trajectories(T)
    if counts.max() > n_traj:
        raise UsageError(f"strategy {cfg.strategy} keeps up to {int(counts.max())} samples at one step but only "
                         f"{n_traj} trajectories are run; raise n_trajectories")
    provided = cond is not None
    cond = cond if provided else make_conditioning(model, n_traj, cfg)
    check_cond(cond, model, n_traj)
    rng = np.random.default_rng([int(cfg.seed), 0xC0C])
    writer = ShardWriter(out_dir, "c_qc", cfg.shard_size)
    t0 = time.perf_counter()
    model.unet.to(device)

    if not strat.needs_features:
        keep = np.zeros((T, n_traj), dtype=bool)
        for i in np.flatnonzero(counts):
            keep[i, strat.select(int(i), int(counts[i]), np.arange(n_traj), None, rng)] = True

        def on_call(i, t, x, c, out, ids):
            k = keep[i, ids]
            if k.any():
                writer.add(_rows(i, t, x, c, ids, k))

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
                rows = _rows(i, t, x, c, ids, np.ones(len(ids), dtype=bool))
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

    meta = model_meta(model, T)
    meta.update({"strategy": strat.describe(), "seed": cfg.seed, "n_trajectories": n_traj, "eta": cfg.eta,
                 "conditioning": conditioning_meta(model, cond, provided, cfg), "config": cfg.cqc_dict(),
                 "collect_seconds": round(time.perf_counter() - t0, 3)})
    return writer.close(meta)


def calibrate(model: LoadedModel, cfg: CalibConfig, out_dir: str | Path, device: str | torch.device = "cpu",
              cond: Optional[torch.Tensor] = None, quiet: bool = True) -> dict[str, Optional[dict[str, Any]]]:
    """Collect C_QC into `out_dir/c_qc` and (cfg.with_dc) C_DC into `out_dir/c_dc`; return both manifests."""
    from .distill_set import collect_cdc

    out = Path(out_dir)
    result: dict[str, Optional[dict[str, Any]]] = {"c_qc": collect_cqc(model, cfg, out / "c_qc", device, cond, quiet)}
    result["c_dc"] = collect_cdc(model, cfg, out / "c_dc", device, cond, quiet) if cfg.with_dc else None
    return result
