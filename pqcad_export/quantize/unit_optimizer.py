"""The per-unit optimiser: AdaRound weight segments, transitions between bit widths and LSQ activation steps.

Schedules (schedules.py) drive it through `init_weights`, `segment` and `transition`; the reconstruction loss
(`rec_loss`) is BRECQ's block-output loss here, FBR's in fbr.py. Registered as the `block` loss.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import PqcadError
from .blocks import Unit
from .capture import Captured, slices
from .config import ReconConfig, ReconLoss
from .schedules import register_loss


@register_loss(ReconLoss.BLOCK)
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
        for sl in slices(rows.numel(), self.cfg.capture_batch_size):
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
            for sl in slices(self.train_idx.numel(), self.cfg.capture_batch_size):
                self.run(self.train_idx[sl])
        finally:
            for q in qs:
                q.calibrating = False
        for q in qs:
            q.init_from_data(self.cfg.act_init.value)

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

    @classmethod
    def create(cls, model: nn.Module, unit: Unit, inputs: Captured, target: torch.Tensor,
               fisher_w: Optional[torch.Tensor], cfg: ReconConfig, device: torch.device, seed: int, progress=None,
               *, fp_model: nn.Module, calib: dict[str, torch.Tensor]) -> "UnitContext":
        """The context for one unit; subclasses for other losses may use the FP model and calibration rows."""
        return cls(model, unit, inputs, target, fisher_w, cfg, device, seed, progress)
