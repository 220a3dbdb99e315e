"""Running the FP model's DDIM trajectories and taking rows from them: the shared machinery of C_QC (collect.py,
pcr.py) and C_DC (distill_set.py), kept apart so that those collectors import it instead of each other.

Also the conditioning of conditional UNets that come without their text encoder, and the manifest fields every
calibration set shares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from pqcad_export.errors import PqcadError, UsageError
from pqcad_export.model_io import LoadedModel
from pqcad_export.sampling import SamplerConfig, TorchUNet, UNetFn, ddim_sample, ddim_timesteps

if TYPE_CHECKING:
    from .config import CalibConfig

# on_call(step_index, t[B], z_t[B,...], cond[B,...] | None, model_output[B,...], trajectory_ids[B])
CallHook = Callable[[int, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor, np.ndarray], None]


def make_conditioning(model: LoadedModel, n: int, cfg: "CalibConfig") -> Optional[torch.Tensor]:
    """Conditioning for conditional UNets that come without their text encoder: seeded N(0,1) tokens
    [n, cond_tokens, cross_attention_dim]; None for unconditional UNets. Pass real embeddings instead
    (`cond=` of the collect functions) when you have them."""
    if not model.is_conditional:
        return None
    dim = model.unet.config.cross_attention_dim
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    g = torch.Generator().manual_seed(int(cfg.seed) * 7919 + 17)
    return torch.randn((n, cfg.cond_tokens, int(dim)), generator=g)


def conditioning_meta(model: LoadedModel, cond: Optional[torch.Tensor], provided: bool, cfg: "CalibConfig"):
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


def resolve_cond(model: LoadedModel, cfg: "CalibConfig", n: int, cond: Optional[torch.Tensor]
                 ) -> tuple[Optional[torch.Tensor], bool]:
    """(conditioning for n trajectories, whether the caller provided it): the caller's, else seeded tokens for a
    conditional UNet; checked against the model."""
    provided = cond is not None
    cond = cond if provided else make_conditioning(model, n, cfg)
    check_cond(cond, model, n)
    return cond, provided


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


def step_rows(step: int, t: torch.Tensor, x: torch.Tensor, c: Optional[torch.Tensor], ids: np.ndarray,
              keep: np.ndarray) -> dict[str, torch.Tensor]:
    """The calibration rows of one UNet call: the `keep`-masked z_t, t, step index, trajectory id (and cond)."""
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


def cqc_meta(model: LoadedModel, cfg: "CalibConfig", strategy: dict[str, Any], n_traj: int,
             cond: Optional[torch.Tensor], provided: bool, seconds: float, **extra: Any) -> dict[str, Any]:
    """The manifest fields of a C_QC set (whatever collected it); `extra` goes before the timing."""
    meta = model_meta(model, cfg.steps)
    meta.update({"strategy": strategy, "seed": cfg.seed, "n_trajectories": n_traj, "eta": cfg.eta,
                 "conditioning": conditioning_meta(model, cond, provided, cfg), "config": cfg.cqc_dict(),
                 **extra, "collect_seconds": round(seconds, 3)})
    return meta
