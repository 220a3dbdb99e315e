"""Block reconstruction (BRECQ / Q-Diffusion style) with per-block checkpoints, and `quantize_model`.

For each unit, in execution order:
  1. inputs: the unit's inputs in the *quantized* model (earlier units already quantized and frozen);
     targets: the FP unit's outputs in the FP model; optionally Fisher weights E[(J^T r)^2] = diag(J^T J) with
     J = d eps / d unit-output (a one-probe Hutchinson estimate), the squared-gradient weighting of Eq. (5).
  2. weights: AdaRound on the output MSE (+ rounding regulariser), through a schedule: direct (kappa bits),
     pq (tau = 2 kappa then kappa, progressive.py) or bitshrink (fixed cycles, bitshrink.py); Alg. 2 l. 19-20.
  3. activations: LSQ step sizes, initialised from data, weights hard-rounded, optional QDrop (Alg. 2 l. 21-22).
  4. freeze to integers, write the unit's state atomically (checkpoint_dir), go on.
Everything stays on `device`; the loss is read back only every `sync_every` iterations.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..bits import BitSpec, parse_bits
from ..atomic import atomic_write_bytes
from ..atomic import atomic_write_json as _atomic_write_json
from ..errors import PqcadError, UsageError
from .blocks import Unit, call_unet, find_units, first_tensor
from .model import QuantizedModel
from .plan import DEFAULT_FP_BUDGET, DEFAULT_W8_BUDGET, MixedPrecision, PlanConfig
from .wrap import freeze_all, layer_specs, wrap_unet


class Method(str, Enum):
    """Weight schedules; `rtn` learns nothing (round-to-nearest + MSE scales, the baseline the floor guards)."""

    DIRECT = "direct"
    PQ = "pq"
    BITSHRINK = "bitshrink"
    RTN = "rtn"


METHODS = tuple(m.value for m in Method)


@dataclass
class PQConfig:
    """Progressive Quantization (paper Alg. 3) hyper-parameters; defaults are the paper's."""

    pi: float = 0.04            # fire when the relative gap |L_avg - G| / max(L_avg, eps) < pi
    beta: float = 0.9           # momentum of G
    eps: float = 1e-8
    window: int = 500           # W: number of recent losses averaged into L_avg
    force_fraction: float = 0.5  # transition forced at this fraction of the weight budget
    sync_every: int = 0         # detector reads losses every n iterations (0: 1 on CPU, 25 on GPU)


@dataclass
class ReconConfig:
    """Block reconstruction settings. `preset("paper")`: 20k AdaRound iterations per block, batch 32."""

    iters: int = 20000          # weight (AdaRound) iterations per block: the budget PQ splits between tau and kappa
    act_iters: int = 5000       # LSQ iterations per block (BRECQ's default)
    batch_size: int = 32
    w_lr: float = 1e-3          # Adam on AdaRound alpha
    a_lr: float = 4e-5          # Adam on LSQ steps (cosine decay)
    round_weight: float = 0.01  # lambda of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2         # fraction of a segment without the regulariser before beta annealing starts
    fisher: bool = True         # weight the output MSE by squared gradients (Eq. 5)
    qdrop_prob: float = 0.0     # QDrop: keep each activation in FP with this probability during LSQ
    recon_loss: str = "block"   # "block" (BRECQ) | "fbr": + fbr_gamma * layer-wise losses (EDA-DM, fbr.py)
    fbr_gamma: float = 0.8      # EDA-DM's CIFAR-10 DDIM setting (official scripts, --add_loss 0.8)
    act_init: str = "mse"       # "mse" | "percentile"
    attn_matmul_quant: bool = False  # also quantize q, k, v and softmax output of attention
    first_last_bits: Optional[int] = 8
    io_act_quant: bool = False  # also quantize the inputs of conv_in (x_t) and conv_out (wrap.py says why not)
    capture_batch_size: int = 64
    max_calib: Optional[int] = None  # use at most this many calibration inputs
    seed: int = 0
    progress: bool = True
    pq: PQConfig = field(default_factory=PQConfig)
    bitshrink_stages: int = 0   # 0: one stage per bit from tau down to kappa
    curve_unit: Optional[str] = None  # unit whose loss curve is plotted (default: first with a transition)
    mixed_precision: str = "off"  # "auto": sensitivity-driven plan (plan.py); the CLI's default is auto
    fp_budget: float = DEFAULT_FP_BUDGET  # max fraction of conv/linear MACs with FP inputs (auto)
    w8_budget: float = DEFAULT_W8_BUDGET  # max fraction of conv/linear weights kept at 8 bits (auto, K < 8)
    floor_holdout: float = 0.125  # calibration rows held out per block for the RTN floor (floor.py); 0 = off

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ReconConfig":
        if name == "paper":
            cfg = cls()
        elif name == "quick":
            # Sized so the built-in 2.2M-param teacher finishes W4A8 in a few minutes on 2 CPU cores.
            cfg = cls(iters=160, act_iters=40, batch_size=8, w_lr=5e-2, a_lr=1e-3, fisher=False,
                      capture_batch_size=32, max_calib=128, pq=PQConfig(window=20, force_fraction=0.5))
        else:
            raise UsageError(f"unknown preset '{name}': expected quick or paper")
        return replace(cfg, **overrides) if overrides else cfg

    def __post_init__(self) -> None:
        if isinstance(self.pq, dict):  # from JSON (e.g. PCR's stored pcr_recon overrides)
            try:
                self.pq = PQConfig(**self.pq)
            except TypeError as exc:
                raise UsageError(f"bad PQ settings {self.pq}: {exc}") from None
        if self.recon_loss not in ("block", "fbr"):
            raise UsageError(f"unknown --recon-loss '{self.recon_loss}': expected block or fbr")
        if not self.fbr_gamma >= 0:
            raise UsageError(f"--fbr-gamma must be >= 0, got {self.fbr_gamma}")
        if not 0.0 <= self.qdrop_prob <= 1.0:
            raise UsageError(f"--qdrop must be in [0, 1], got {self.qdrop_prob}")
        self.mixed_precision = self.plan_config().mode.value
        if not 0.0 <= self.floor_holdout < 1.0:
            raise UsageError(f"floor_holdout must be in [0, 1), got {self.floor_holdout}")

    def plan_config(self) -> PlanConfig:
        return PlanConfig(self.mixed_precision, self.fp_budget, self.w8_budget)

    def fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("progress", None)
        d.pop("curve_unit", None)
        if d.get("recon_loss") == "block":  # keep fingerprints of plain block reconstruction unchanged
            d.pop("recon_loss", None)
            d.pop("fbr_gamma", None)
        if d.get("mixed_precision") == MixedPrecision.OFF.value:  # the plan enters the key only when on
            for k in ("mixed_precision", "fp_budget", "w8_budget"):
                d.pop(k, None)
        return d


# ---------------------------------------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------------------------------------
def collect_calibration(batches: Iterable[dict], device: torch.device, max_n: Optional[int] = None
                        ) -> dict[str, torch.Tensor]:
    """Concatenate an iterable of {"sample", "timestep"[, "encoder_hidden_states"]} batches on `device`
    (at most `max_n` rows, evenly spaced over the whole set)."""
    parts: dict[str, list[torch.Tensor]] = {}
    n = 0
    for b in batches:
        if not isinstance(b, dict) or "sample" not in b or "timestep" not in b:
            raise PqcadError("calibration batches must be dicts with 'sample' and 'timestep'")
        x = torch.as_tensor(b["sample"])
        if x.dim() != 4:
            raise PqcadError(f"calibration 'sample' must be [B,C,H,W], got shape {tuple(x.shape)}")
        t = torch.as_tensor(b["timestep"]).reshape(-1)
        if t.numel() == 1 and x.shape[0] > 1:
            t = t.expand(x.shape[0])
        if t.numel() != x.shape[0]:
            raise PqcadError("calibration 'timestep' must have one entry per sample")
        parts.setdefault("sample", []).append(x.float())
        parts.setdefault("timestep", []).append(t.long())
        if b.get("encoder_hidden_states") is not None:
            parts.setdefault("encoder_hidden_states", []).append(torch.as_tensor(b["encoder_hidden_states"]).float())
        n += x.shape[0]
    if n == 0:
        raise PqcadError("no calibration data")
    out = {k: torch.cat(v) for k, v in parts.items()}
    if "encoder_hidden_states" in out and out["encoder_hidden_states"].shape[0] != n:
        raise PqcadError("calibration 'encoder_hidden_states' missing for some batches")
    if max_n is not None and n > max_n:  # evenly spaced rows: stored sets are often ordered by time step
        keep = torch.linspace(0, n - 1, max_n).round().long()
        out = {k: v[keep] for k, v in out.items()}
    out = {k: v.to(device) for k, v in out.items()}
    return out


def calibration_hash(calib: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(calib):
        t = calib[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _slices(n: int, bs: int):
    for i in range(0, n, bs):
        yield slice(i, min(i + bs, n))


def _calib_batch(calib: dict[str, torch.Tensor], sl) -> dict[str, torch.Tensor]:
    return {k: v[sl] for k, v in calib.items()}


# ---------------------------------------------------------------------------------------------------------------
# capturing unit inputs / targets
# ---------------------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


class Captured:
    """A unit's call inputs for all calibration samples: tensors with a batch dim are concatenated."""

    def __init__(self, calls: list[tuple[tuple, dict]]):
        n_per = [self._batch_len(a, k) for a, k in calls]
        self.n = sum(n_per)
        a0, k0 = calls[0]
        self.args = [self._merge([c[0][i] for c in calls], n_per) for i in range(len(a0))]
        self.kwargs = {key: self._merge([c[1][key] for c in calls], n_per) for key in k0}

    @staticmethod
    def _batch_len(args, kwargs) -> int:
        for v in list(args) + list(kwargs.values()):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return v.shape[0]
        raise PqcadError("unit input has no batched tensor")

    @staticmethod
    def _merge(vals, n_per):
        if isinstance(vals[0], torch.Tensor) and vals[0].dim() > 0 and \
                all(v.shape[0] == n for v, n in zip(vals, n_per)):
            return ("t", torch.cat([v.detach() for v in vals]))
        return ("c", vals[0])

    def get(self, idx) -> tuple[tuple, dict]:
        def pick(e):
            return e[1][idx] if e[0] == "t" else e[1]
        return tuple(pick(e) for e in self.args), {k: pick(e) for k, e in self.kwargs.items()}


@torch.no_grad()
def capture_inputs(model: nn.Module, unit: Unit, calib: dict[str, torch.Tensor], bs: int) -> Captured:
    mod = model.get_submodule(unit.entry)
    calls: list[tuple[tuple, dict]] = []

    def hook(_m, args, kwargs):
        calls.append((tuple(args), dict(kwargs)))
        raise _Stop

    h = mod.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sl in _slices(calib["sample"].shape[0], bs):
            try:
                call_unet(model, _calib_batch(calib, sl))
            except _Stop:
                pass
    finally:
        h.remove()
    if not calls:
        raise PqcadError(f"block {unit.name} was never called")
    return Captured(calls)


def capture_targets(fp_model: nn.Module, unit: Unit, calib: dict[str, torch.Tensor], bs: int, fisher: bool,
                    seed: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """FP unit outputs and, with `fisher`, per-element weights (J^T r)^2 normalised to mean 1 per sample."""
    mod = fp_model.get_submodule(unit.exit)
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _args, out):
        t = first_tensor(out)
        if not fisher:
            store["out"] = t.detach()
            raise _Stop
        leaf = t.detach().requires_grad_(True)
        store["out"] = leaf
        if isinstance(out, torch.Tensor):
            return leaf
        if isinstance(out, tuple):
            return (leaf, *out[1:])
        raise PqcadError(f"cannot weight block {unit.name}: unsupported output type {type(out).__name__}")

    outs, weights = [], []
    gen = torch.Generator(device=calib["sample"].device).manual_seed(seed)
    h = mod.register_forward_hook(hook)
    try:
        for sl in _slices(calib["sample"].shape[0], bs):
            batch = _calib_batch(calib, sl)
            if not fisher:
                with torch.no_grad():
                    try:
                        call_unet(fp_model, batch)
                    except _Stop:
                        pass
                outs.append(store["out"])
                continue
            with torch.enable_grad():
                eps = call_unet(fp_model, batch)
                r = torch.randn(eps.shape, generator=gen, device=eps.device)
                g, = torch.autograd.grad((eps * r).sum(), store["out"])
            w = g.pow(2)
            w = w / w.flatten(1).mean(1).clamp_min(1e-20).view(-1, *[1] * (w.dim() - 1))
            outs.append(store["out"].detach())
            weights.append(w.detach())
    finally:
        h.remove()
    return torch.cat(outs), (torch.cat(weights) if fisher else None)


# ---------------------------------------------------------------------------------------------------------------
# per-unit optimisation context (shared by direct / pq / bitshrink schedules)
# ---------------------------------------------------------------------------------------------------------------
class UnitContext:
    """Everything one unit's optimisation needs; schedules call `init_weights`, `segment` and `transition`."""

    def __init__(self, model: nn.Module, unit: Unit, inputs: Captured, target: torch.Tensor,
                 fisher_w: Optional[torch.Tensor], cfg: ReconConfig, device: torch.device, seed: int,
                 progress=None):
        self.model, self.unit, self.inputs, self.target, self.fisher_w = model, unit, inputs, target, fisher_w
        self.cfg, self.device = cfg, device
        self.layers = [m for _, m in unit.quant_layers(model)]
        self.final_bits = [m.weight_bits for m in self.layers]
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.progress = progress
        self.iteration = 0             # weight iterations done so far (over all segments)
        self.curve: list[torch.Tensor] = []  # per-iteration reconstruction loss chunks (CPU)
        self.events: list[dict] = []
        sync = cfg.pq.sync_every or (1 if device.type == "cpu" else 25)
        self.sync_every = max(1, int(sync))
        self._task = None
        self._fresh: dict[int, int] = {}  # layers initialised at these bits and not optimised since
        n_held = int(inputs.n * cfg.floor_holdout) if inputs.n >= 2 else 0
        perm = torch.randperm(inputs.n, generator=torch.Generator().manual_seed(seed)).to(device)
        self.held_idx = perm[:n_held].sort().values   # never trained on: the floor's judge (floor.py)
        self.train_idx = perm[n_held:].sort().values if n_held else torch.arange(inputs.n, device=device)

    # -- data -------------------------------------------------------------------------------------------------
    def run(self, idx) -> torch.Tensor:
        args, kwargs = self.inputs.get(idx)
        return self.unit.run(self.model, args, kwargs)

    def rec_loss(self, out: torch.Tensor, idx) -> torch.Tensor:
        """BRECQ's output loss: squared error summed over channels, averaged over the rest (Fisher-weighted)."""
        err = (out - self.target[idx]).pow(2)
        if self.fisher_w is not None:
            err = err * self.fisher_w[idx]
        return err.sum(1).mean() if err.dim() > 1 else err.mean()

    def sample_idx(self) -> torch.Tensor:
        n = self.train_idx.numel()
        return self.train_idx[torch.randint(0, n, (min(self.cfg.batch_size, n),), device=self.device,
                                            generator=self.gen)]

    @torch.no_grad()
    def perturbation(self, rows: Optional[torch.Tensor] = None) -> float:
        """Plain output MSE of the unit over `rows` (default all calibration inputs; no Fisher weights, no QDrop)."""
        rows = torch.arange(self.inputs.n, device=self.device) if rows is None else rows
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for sl in _slices(rows.numel(), self.cfg.capture_batch_size):
            idx = rows[sl]
            total += (self.run(idx) - self.target[idx]).double().pow(2).sum()
        return float(total / max(1, rows.numel() * self.target[0].numel()))

    # -- weights ----------------------------------------------------------------------------------------------
    def init_weights(self, bits: list[int], mode: str = "soft") -> None:
        """MSE-search delta and set alpha from the fractional part at `bits` (kept if already so initialised)."""
        for m, b in zip(self.layers, bits):
            if not (self._fresh.get(id(m)) == b and m.wq.bits == b and m.wq.alpha is not None):
                m.wq.init(m.w_fp, bits=b)
                self._fresh[id(m)] = b
            m.wq.mode = mode

    @torch.no_grad()
    def transition(self, bits: list[int], reason: str) -> None:
        """Re-initialise each layer at new bits from its current *soft-quantised* weights (PQ, Alg. 2)."""
        for m, b in zip(self.layers, bits):
            d = m.wq.delta.reshape(m.wq._bshape(m.w_fp))
            w_soft = m.wq.integers(m.w_fp, "soft") * d
            m.w_fp.copy_(w_soft)
            m.wq.init(w_soft, bits=b)
            self._fresh[id(m)] = b
            m.wq.mode = "soft"
        self.events.append({"iteration": self.iteration, "bits": bits, "reason": reason})

    def segment(self, iters: int, regularize: bool = True, detector=None, label: str = "") -> int:
        """AdaRound for up to `iters` iterations at the current bits; stops early when `detector` fires.

        The regulariser follows BRECQ: off for the first `warmup` fraction, then beta decays linearly from
        beta_start to beta_end over the rest of this segment. Returns the iterations run.
        """
        cfg = self.cfg
        if iters <= 0 or not self.layers:
            return 0
        params = [m.wq.alpha for m in self.layers]
        self._fresh.clear()
        opt = torch.optim.Adam(params, lr=cfg.w_lr)
        buf = torch.zeros(iters, device=self.device)
        warm = int(cfg.warmup * iters)
        last, done, fired = 0, 0, False
        for it in range(iters):
            idx = self.sample_idx()
            rec = self.rec_loss(self.run(idx), idx)
            loss = rec
            if regularize and it >= warm:
                rel = (it - warm) / max(1, iters - warm)
                beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1 - rel)
                loss = rec + cfg.round_weight * sum(m.wq.round_loss(beta) for m in self.layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            buf[it] = rec.detach()
            done = it + 1
            if done % self.sync_every == 0 or done == iters:
                chunk = buf[last:done].cpu()
                self._check_finite(chunk, self.iteration + last)
                if detector is not None:
                    for j, v in enumerate(chunk.tolist()):
                        if detector.update(v):
                            self.events.append({"iteration": self.iteration + last + j, "detector_fired": True})
                            fired = True
                            break
                self.curve.append(chunk)
                self._advance(done - last, float(chunk[-1]), label)
                last = done
                if fired:
                    break
        self.iteration += done
        return done

    # -- activations ------------------------------------------------------------------------------------------
    def act_quantizers(self):
        qs = [q for m in self.layers for q in m.act_quantizers() if q.enabled]
        qs += [q for p in self.unit.attn_processors(self.model) for q in p.act_quantizers() if q.enabled]
        return qs

    @torch.no_grad()
    def init_act_scales(self) -> None:
        qs = self.act_quantizers()
        for q in qs:
            q.calibrating = True
        try:
            for sl in _slices(self.train_idx.numel(), self.cfg.capture_batch_size):
                self.run(self.train_idx[sl])
        finally:
            for q in qs:
                q.calibrating = False
        for q in qs:
            q.init_from_data(self.cfg.act_init)

    def optimize_act_scales(self, iters: int) -> None:
        cfg = self.cfg
        qs = self.act_quantizers()
        if not qs or iters <= 0:
            return
        opt = torch.optim.Adam([q.scale for q in qs], lr=cfg.a_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
        for q in qs:
            q.drop_prob, q.drop_generator = cfg.qdrop_prob, self.gen
            q.scale.requires_grad_(True)
            q.train()
        buf = torch.zeros(iters, device=self.device)
        last = 0
        try:
            for it in range(iters):
                idx = self.sample_idx()
                loss = self.rec_loss(self.run(idx), idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                buf[it] = loss.detach()
                if (it + 1) % max(self.sync_every, 25) == 0 or it + 1 == iters:
                    chunk = buf[last:it + 1].cpu()
                    self._check_finite(chunk, last, "activation")
                    self._advance(it + 1 - last, float(chunk[-1]), "act")
                    last = it + 1
        finally:
            for q in qs:
                q.drop_prob, q.drop_generator = 0.0, None
                q.scale.requires_grad_(False)
                q.eval()
        for q in qs:
            if not torch.isfinite(q.scale).all() or float(q.scale.abs()) == 0:
                raise PqcadError(f"non-finite or zero activation step in block {self.unit.name}")
            q.scale.data = q.scale.data.abs()

    # -- helpers ----------------------------------------------------------------------------------------------
    def _check_finite(self, chunk: torch.Tensor, it0: int, phase: str = "weight") -> None:
        if not torch.isfinite(chunk).all():
            bad = int((~torch.isfinite(chunk)).nonzero()[0, 0]) + it0
            raise PqcadError(f"non-finite reconstruction loss in block {self.unit.name} "
                             f"({phase} phase, iteration {bad})"
                             f"; no quantized model was written (finished blocks stay checkpointed)")

    def _advance(self, n: int, loss: float, label: str) -> None:
        if self.progress is not None and self._task is not None:
            self.progress.update(self._task, advance=n, loss=f"{loss:.3e}", phase=label)

    def loss_curve(self) -> list[float]:
        return torch.cat(self.curve).tolist() if self.curve else []


def direct_schedule(ctx: UnitContext) -> dict[str, Any]:
    """Plain AdaRound at the final bits for the whole budget (Q-Diffusion / BRECQ)."""
    ctx.init_weights(ctx.final_bits)
    ctx.segment(ctx.cfg.iters, regularize=True, label="w")
    return {"bits_start": ctx.final_bits, "transition_iter": None}


def _schedule(method: str) -> Callable[[UnitContext], dict[str, Any]]:
    if method == "direct":
        return direct_schedule
    if method == "pq":
        from .progressive import pq_schedule
        return pq_schedule
    if method == "bitshrink":
        from .bitshrink import bitshrink_schedule
        return bitshrink_schedule
    if method == "rtn":
        from .floor import rtn_schedule
        return rtn_schedule
    raise UsageError(f"unknown --method '{method}': expected one of {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------
def atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_json(path, obj, indent=1)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def _unit_state(model: nn.Module, unit: Unit) -> dict[str, torch.Tensor]:
    out = {}
    for m in unit.members:
        for k, v in model.get_submodule(m).state_dict().items():
            out[f"{m}.{k}"] = v
    return out


def _load_unit_state(model: nn.Module, unit: Unit, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(next(iter(model.buffers())).device))
    for _, layer in unit.quant_layers(model):
        if not layer.wq.frozen:
            layer.prepare_frozen(tuple(layer.w_fp.shape))
    for m in unit.members:
        sub = {k[len(m) + 1:]: v for k, v in state.items() if k.startswith(m + ".")}
        model.get_submodule(m).load_state_dict(sub, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------------------------
def _make_progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[phase]:>3} loss {task.fields[loss]}"), TimeElapsedColumn())


def quantize_model(loaded, calib_batches: Iterable[dict], bits: BitSpec | str = "w4a8", method: str = "pq",
                   cfg: Optional[ReconConfig] = None, device: str | torch.device = "cpu",
                   checkpoint_dir: Optional[str | Path] = None,
                   on_unit_done: Optional[Callable[[int, str], None]] = None) -> QuantizedModel:
    """Quantize a `model_io.LoadedModel` (weights AdaRound, activations LSQ) block by block.

    `checkpoint_dir`: after each finished block its state is written atomically; a rerun with the same model,
    data, bits, method and config skips finished blocks and ends bit-identical to an uninterrupted run.
    `on_unit_done(index, name)` is called after each block is finished and checkpointed.
    """
    cfg = cfg or ReconConfig.preset("quick")
    bits = parse_bits(bits) if isinstance(bits, str) else bits
    schedule = _schedule(method)
    device = torch.device(device)
    t_start = time.time()

    calib = collect_calibration(calib_batches, device, cfg.max_calib)
    fp = loaded.unet
    if calib["sample"].shape[1:] != torch.Size(loaded.sample_shape):
        raise PqcadError(f"calibration samples have shape {tuple(calib['sample'].shape[1:])}, "
                         f"the model expects {loaded.sample_shape}")
    if loaded.is_conditional and "encoder_hidden_states" not in calib:
        raise PqcadError("a conditional UNet needs 'encoder_hidden_states' in the calibration data")
    fp = fp.to(device).float().eval()
    fp.requires_grad_(False)
    from .plan import decide_plan, plan_from_specs
    from .sensitivity import mac_table

    pcfg = cfg.plan_config()
    sens = None
    if pcfg.mode is MixedPrecision.AUTO:  # decided before reconstruction, applied when wrapping
        sens = _sensitivity(fp, calib, bits, cfg, loaded.fingerprint, checkpoint_dir)
    plan = decide_plan(sens, pcfg, bits.act_bits, bits.quantize_activations)
    qmodel = copy.deepcopy(fp)
    wrap_unet(qmodel, bits, cfg.first_last_bits, cfg.attn_matmul_quant, cfg.io_act_quant,
              fp_act=plan.fp_act_layers, w8=plan.w8_layers)
    qmodel.requires_grad_(False)
    units = find_units(fp, _calib_batch(calib, slice(0, 2)))  # same module names; FP avoids lazy inits

    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    key = {"bits": bits.name, "method": method, "cfg": cfg.fingerprint(), "model": loaded.fingerprint,
           "calib": calibration_hash(calib), "units": [u.name for u in units]}
    if pcfg.mode is not MixedPrecision.OFF:
        key["plan"] = {"fp_act": plan.fp_act_layers, "w8": plan.w8_layers}
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    progress_doc: dict[str, Any] = {"key": key_hash, "done": [], "log": []}
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        pf = ckpt / "progress.json"
        if pf.is_file():
            try:
                old = json.loads(pf.read_text())
            except json.JSONDecodeError:
                old = {}
            if old.get("key") == key_hash:
                progress_doc = old
        atomic_write_json(pf, progress_doc)

    logs: list[dict] = list(progress_doc["log"])
    reused = 0
    with _make_progress(cfg.progress) as progress:
        for ui, unit in enumerate(units):
            upath = ckpt / f"unit_{ui:03d}.safetensors" if ckpt else None
            if unit.name in progress_doc["done"] and upath is not None and upath.is_file():
                _load_unit_state(qmodel, unit, upath)
                reused += 1
                continue
            t0 = time.time()
            entry = _reconstruct_unit(qmodel, fp, unit, calib, cfg, schedule, device, ui, bits, progress)
            entry["seconds"] = round(time.time() - t0, 3)
            entry["method"] = method
            logs.append(entry)
            if ckpt is not None:
                atomic_save_tensors(upath, _unit_state(qmodel, unit))
                progress_doc["done"].append(unit.name)
                progress_doc["log"] = logs
                atomic_write_json(ckpt / "progress.json", progress_doc)
            if on_unit_done is not None:
                on_unit_done(ui, unit.name)

    freeze_all(qmodel)  # layers no unit executed keep round-to-nearest
    qmodel.eval()
    perts = [e["pert"] for e in logs if e.get("pert") is not None]
    log = {"method": method, "bits": bits.name, "units": logs,
           "geomean_pert": _geomean(perts), "seconds": round(time.time() - t_start, 3),
           "device": str(device), "config": cfg.fingerprint(), "reused_units": reused}
    meta = {"bits": bits.name, "method": method, "steps": 100, "scheduler_config": dict(loaded.scheduler_config),
            "unet_config": _unet_config(fp), "class_name": loaded.class_name,
            "source_fingerprint": loaded.fingerprint, "first_last_bits": cfg.first_last_bits,
            "attn_matmul_quant": cfg.attn_matmul_quant, "io_act_quant": cfg.io_act_quant,
            "layers": layer_specs(qmodel),
            "calibration": {"n": int(calib["sample"].shape[0]), "hash": key["calib"]}}
    costs = sens or mac_table(fp, _calib_batch(calib, slice(0, 1)))
    meta["mixed_precision"] = plan_from_specs(meta["layers"], costs, pcfg, plan).to_dict()
    floors = [e["name"] for e in logs if e.get("floor_used")]
    log["floor_used_blocks"] = floors
    return QuantizedModel(unet=qmodel, bits=bits, method=method, meta=meta, log=log, sensitivity=sens)


def _sensitivity(fp, calib, bits: BitSpec, cfg: ReconConfig, model_fp: str, checkpoint_dir) -> dict[str, Any]:
    """measure_sensitivity, reused from the checkpoint directory when model, data and bits are unchanged."""
    from .sensitivity import measure_sensitivity

    key = hashlib.sha256(json.dumps([model_fp, calibration_hash(calib), bits.name, cfg.first_last_bits,
                                     cfg.io_act_quant]).encode()).hexdigest()[:16]
    f = Path(checkpoint_dir) / "sensitivity.json" if checkpoint_dir else None
    if f is not None and f.is_file():
        try:
            doc = json.loads(f.read_text())
            if doc.get("key") == key:
                return doc
        except json.JSONDecodeError:
            pass
    doc = measure_sensitivity(fp, calib, bits, cfg.first_last_bits, cfg.io_act_quant)
    doc["key"] = key
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(f, doc)
    return doc


def _geomean(xs: list[float]) -> Optional[float]:
    xs = [max(float(x), 1e-30) for x in xs]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _unet_config(unet: nn.Module) -> dict[str, Any]:
    cfg = dict(unet.config)
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _reconstruct_unit(qmodel, fp, unit: Unit, calib, cfg: ReconConfig, schedule, device, ui: int, bits: BitSpec,
                      progress) -> dict[str, Any]:
    seed = cfg.seed * 1_000_003 + ui
    inputs = capture_inputs(qmodel, unit, calib, cfg.capture_batch_size)
    target, fw = capture_targets(fp, unit, calib, cfg.capture_batch_size, cfg.fisher, seed)
    if cfg.recon_loss == "fbr":
        from .fbr import FbrUnitContext
        ctx = FbrUnitContext(qmodel, unit, inputs, target, fw, cfg, device, seed, progress, fp_model=fp,
                             calib=calib)
    else:
        ctx = UnitContext(qmodel, unit, inputs, target, fw, cfg, device, seed, progress)
    entry: dict[str, Any] = {"name": unit.name, "layers": [n for n, _ in unit.quant_layers(qmodel)],
                             "bits_final": ctx.final_bits}
    has_act = bits.quantize_activations and bool(ctx.act_quantizers())
    total = 0
    if progress is not None:
        total = (cfg.iters if ctx.layers else 0) + (cfg.act_iters if has_act else 0)
        ctx._task = progress.add_task(f"[{ui + 1}] {unit.name}", total=max(total, 1), loss="-", phase="")
    act_flags = [(q, q.enabled) for m in ctx.layers for q in m.act_quantizers()]
    act_flags += [(q, q.enabled) for p in unit.attn_processors(qmodel) for q in p.act_quantizers()]
    learns = getattr(schedule, "learns", True)
    floor = None
    if ctx.held_idx.numel() and (ctx.layers or has_act):  # RTN + MSE-scale start, judged on held-out rows
        from .floor import snapshot
        ctx.init_weights(ctx.final_bits, mode="nearest")  # the learned schedules start from this init too
        if has_act:
            ctx.init_act_scales()
        floor = snapshot(ctx, ctx.act_quantizers())
        entry["heldout_rtn"] = ctx.perturbation(ctx.held_idx)
    for q, _ in act_flags:
        q.enabled = False
    try:
        if ctx.layers:
            ctx.init_weights(ctx.final_bits, mode="nearest")
            entry["pert_nearest_w"] = ctx.perturbation()
            with torch.enable_grad():
                entry.update(schedule(ctx))
            for m in ctx.layers:
                m.wq.mode = "hard"
                if not torch.isfinite(m.wq.alpha).all() or not torch.isfinite(m.w_fp).all():
                    raise PqcadError(f"non-finite weights in block {unit.name}"
                                     f"; no quantized model was written (finished blocks stay checkpointed)")
            entry["pert_w"] = ctx.perturbation()
    finally:
        for q, en in act_flags:
            q.enabled = en
    if has_act and (learns or floor is None):
        ctx.init_act_scales()
        with torch.enable_grad():
            ctx.optimize_act_scales(cfg.act_iters if learns else 0)
    if floor is not None:
        entry["heldout_learned"] = ctx.perturbation(ctx.held_idx)
        entry["floor_used"] = bool(entry["heldout_learned"] > entry["heldout_rtn"])
        if entry["floor_used"]:  # learning lost to its own starting point: keep the start
            from .floor import restore
            restore(ctx, floor, ctx.act_quantizers())
        entry["heldout_final"] = ctx.perturbation(ctx.held_idx)
    entry["pert"] = ctx.perturbation()
    if not math.isfinite(entry["pert"]):
        raise PqcadError(f"non-finite output of block {unit.name}"
                         f"; no quantized model was written (finished blocks stay checkpointed)")
    entry["events"] = ctx.events
    curve = ctx.loss_curve()
    stride = max(1, len(curve) // 1000)
    entry["curve_stride"] = stride
    entry["curve"] = curve[::stride]
    for m in ctx.layers:
        m.freeze()
    if progress is not None:
        progress.update(ctx._task, completed=max(total, 1))
    return entry
