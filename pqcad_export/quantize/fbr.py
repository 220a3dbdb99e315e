"""EDA-DM's fine-grained block reconstruction (FBR, arXiv 2401.04585, Sec. 4.3).

Block reconstruction (BRECQ) only matches a block's final output; FBR adds the output loss of every quantized
layer inside the block, each against the same layer's output in the FP model (fed the FP model's own inputs):

    L_FBR = L_block + gamma * sum_l || O_l^q - O_l^fp ||^2

Each term uses BRECQ's normalisation (squared error summed over channels, averaged over batch and space); only
the block term carries the optional Fisher weights. Default gamma = 0.8: the official EDA-DM CIFAR-10 / DDIM
setting (`--add_loss 0.8`, github.com/BienLuky/EDA-DM scripts/task_config.py), the closest to our teacher.
Selected with `ReconConfig(recon_loss="fbr", fbr_gamma=...)`; used in both the AdaRound and the LSQ phase.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import PqcadError
from .blocks import Unit, call_unet, first_tensor
from .config import ReconLoss
from .schedules import register_loss
from .unit_optimizer import UnitContext

RECON_LOSSES = tuple(x.value for x in ReconLoss)
FBR_GAMMA_DEFAULT = 0.8


def output_loss(out: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BRECQ's output loss: squared error (optionally weighted) summed over dim 1, averaged over the rest."""
    err = (out - target).pow(2)
    if weight is not None:
        err = err * weight
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


def fbr_loss(block_loss: torch.Tensor, layer_outs: list[torch.Tensor], layer_targets: list[torch.Tensor],
             gamma: float) -> torch.Tensor:
    """L_block + gamma * sum of the layer-wise output losses (EDA-DM Eq. for FBR)."""
    if len(layer_outs) != len(layer_targets):
        raise PqcadError(f"FBR: {len(layer_outs)} layer outputs but {len(layer_targets)} targets")
    if not layer_outs:
        return block_loss
    return block_loss + gamma * sum(output_loss(o, t) for o, t in zip(layer_outs, layer_targets))


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_targets(fp_model: nn.Module, layer_names: list[str], exit_name: str,
                          calib: dict[str, torch.Tensor], bs: int) -> dict[str, list[torch.Tensor]]:
    """FP outputs of each named layer over all calibration samples: {name: [call 0 [N,...], call 1, ...]}.

    The FP model runs until the unit's exit module; a layer called k times per forward gets k targets."""
    per_batch: dict[str, list[list[torch.Tensor]]] = {n: [] for n in layer_names}
    now: dict[str, list[torch.Tensor]] = {}

    def rec(name):
        def hook(_m, _a, out):
            now[name].append(first_tensor(out).detach())
        return hook

    def stop(_m, _a, _o):
        raise _Stop

    hooks = [fp_model.get_submodule(n).register_forward_hook(rec(n)) for n in layer_names]
    hooks.append(fp_model.get_submodule(exit_name).register_forward_hook(stop))
    try:
        n = calib["sample"].shape[0]
        for i in range(0, n, bs):
            now.clear()
            now.update({k: [] for k in layer_names})
            try:
                call_unet(fp_model, {k: v[i:i + bs] for k, v in calib.items()})
            except _Stop:
                pass
            for k in layer_names:
                per_batch[k].append(list(now[k]))
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, list[torch.Tensor]] = {}
    for k, batches in per_batch.items():
        calls = {len(b) for b in batches}
        if len(calls) != 1:
            raise PqcadError(f"FBR: layer {k} is called a varying number of times per forward")
        out[k] = [torch.cat([b[j] for b in batches]) for j in range(calls.pop())]
    return out


class _LayerTap:
    """Records the outputs of the given layers of `model` while active (forward hooks, removed on exit)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, names
        self.outs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self._hooks: list = []

    def __enter__(self):
        self.outs = {n: [] for n in self.names}
        for n in self.names:
            def hook(_m, _a, out, _n=n):
                self.outs[_n].append(first_tensor(out))
            self._hooks.append(self.model.get_submodule(n).register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []


@register_loss(ReconLoss.FBR)
class FbrUnitContext(UnitContext):
    """A `unit_optimizer.UnitContext` whose `rec_loss` is the FBR loss (see module docstring)."""

    def __init__(self, model: nn.Module, unit: Unit, inputs, target: torch.Tensor, fisher_w, cfg, device,
                 seed: int, progress=None, *, fp_model: nn.Module, calib: dict[str, torch.Tensor]):
        super().__init__(model, unit, inputs, target, fisher_w, cfg, device, seed, progress)
        self.gamma = float(cfg.fbr_gamma)
        self.layer_names = [n for n, _ in unit.quant_layers(model)]
        self.layer_targets = capture_layer_targets(fp_model, self.layer_names, unit.exit, calib,
                                                   cfg.capture_batch_size)
        self._tap = _LayerTap(model, self.layer_names)

    @classmethod
    def create(cls, model, unit, inputs, target, fisher_w, cfg, device, seed, progress=None, *, fp_model, calib):
        return cls(model, unit, inputs, target, fisher_w, cfg, device, seed, progress, fp_model=fp_model,
                   calib=calib)

    def run(self, idx) -> torch.Tensor:
        with self._tap:
            return super().run(idx)

    def layer_terms(self, idx) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(quantized layer outputs of the last `run`, their FP targets at rows `idx`), in layer order."""
        outs, tgts = [], []
        for n in self.layer_names:
            got, want = self._tap.outs[n], self.layer_targets[n]
            if len(got) != len(want):
                raise PqcadError(f"FBR: layer {n} ran {len(got)} times, its FP target has {len(want)} calls")
            outs.extend(got)
            tgts.extend(w[idx] for w in want)
        return outs, tgts

    def rec_loss(self, out: torch.Tensor, idx) -> torch.Tensor:
        block = super().rec_loss(out, idx)
        outs, tgts = self.layer_terms(idx)
        return fbr_loss(block, outs, tgts, self.gamma)
