"""The CAD student: a copy of the quantized teacher whose weights stay on the teacher's frozen integer grid.

Mechanism (arXiv 2506.16776 Alg. 4 keeps the student quantized while it learns):
  * every frozen weight quantizer (`w_int`, per-output-channel `delta`) is replaced by a `LatentGridWeight`:
    an FP *latent* weight initialised to the dequantized integers `w_int * delta`; the forward pass uses
    `clamp(round_ste(latent / delta), qmin, qmax) * delta` (straight-through rounding, STE), so the layer always
    computes with grid values and gradients reach the latent. `delta` stays fixed (buffer), so the integer grid the
    exporter writes is the teacher's grid.
  * activation step sizes (LSQ `scale` of every ActQuantizer) stay trainable; biases and normalisation parameters
    (FP in the deployed engine) are trainable too (`train_fp_params`).
  * `freeze_student` writes `round(latent / delta)` back as int8 `w_int` into the original quantizers. Learned
    (AdaRound) rounding is therefore *kept as the starting point*: a weight whose latent never crosses a rounding
    boundary keeps the teacher's learned integer exactly; integers that moved are recomputed by round-to-nearest.

Plain FP modules (no quantize wrappers) get the same treatment through `torch.nn.utils.parametrize` on every
Conv2d/Linear weight, with a per-channel max-abs grid of `bits` bits (round-to-nearest "direct" quantization), or,
with `bits=None`, stay FP (the Distill-only baseline, `distill_fp`).
"""

from __future__ import annotations

import copy
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import PqcadError


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class GridFakeQuant(nn.Module):
    """w -> clamp(round_ste(w / delta), qmin, qmax) * delta with a fixed per-output-channel delta."""

    def __init__(self, delta: torch.Tensor, bits: int, ndim: int):
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("delta", delta.detach().float().clone())
        self._shape = [-1] + [1] * (ndim - 1)

    def integers(self, w: torch.Tensor) -> torch.Tensor:
        qmin, qmax = _qrange(self.bits)
        return torch.clamp(torch.round(w / self.delta.reshape(self._shape)), qmin, qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        qmin, qmax = _qrange(self.bits)
        d = self.delta.reshape(self._shape)
        return torch.clamp(_round_ste(w / d), qmin, qmax) * d


class LatentGridWeight(nn.Module):
    """Drop-in for a frozen WeightQuantizer during CAD: owns the trainable latent weight (see module doc)."""

    frozen = True  # the wrapped layers call wq(None) when frozen

    def __init__(self, w_int: torch.Tensor, delta: torch.Tensor, bits: int, channel_axis: int = 0):
        super().__init__()
        if channel_axis != 0:
            raise PqcadError("CAD supports per-output-channel weight grids on axis 0 only")
        self.fq = GridFakeQuant(delta, bits, w_int.dim())
        self.latent = nn.Parameter(w_int.float() * self.fq.delta.reshape(self.fq._shape))
        self.channel_axis = channel_axis

    @property
    def bits(self) -> int:
        return self.fq.bits

    @property
    def delta(self) -> torch.Tensor:
        return self.fq.delta

    @property
    def w_int(self) -> torch.Tensor:
        return self.fq.integers(self.latent.detach()).to(torch.int8)

    @property
    def initialized(self) -> bool:
        return True

    def forward(self, w=None) -> torch.Tensor:
        return self.fq(self.latent)


def _is_frozen_quant_layer(m: nn.Module) -> bool:
    wq = getattr(m, "wq", None)
    return wq is not None and isinstance(wq, nn.Module) and bool(getattr(wq, "frozen", False)) \
        and hasattr(wq, "w_int") and not isinstance(wq, LatentGridWeight)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Layers with a weight quantizer (`.wq`), frozen or in CAD latent form."""
    for name, m in model.named_modules():
        if isinstance(getattr(m, "wq", None), nn.Module):
            yield name, m


def act_quantizers(model: nn.Module) -> list[nn.Module]:
    """Every LSQ activation quantizer (modules with a `scale` parameter and `qmax`), de-duplicated."""
    seen, out = set(), []
    for m in model.modules():
        if type(m).__name__ == "ActQuantizer" and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def prepare_student(teacher: nn.Module, bits: Optional[int] = 8) -> nn.Module:
    """Deep copy of the (frozen quantized) teacher with latent grid weights; the teacher is left untouched.
    `bits=None` keeps a plain FP teacher's copy FP (the Distill-only baseline: its weights train as they are)."""
    student = copy.deepcopy(teacher)
    if bits is None:
        if any(_is_frozen_quant_layer(m) for m in student.modules()):
            raise PqcadError("an FP student (bits=None) needs an FP teacher, not a quantized one")
        student.requires_grad_(False)
        return student
    n = 0
    for _, m in list(student.named_modules()):
        if _is_frozen_quant_layer(m):
            m.wq = LatentGridWeight(m.wq.w_int, m.wq.delta, m.wq.bits, getattr(m.wq, "channel_axis", 0))
            n += 1
        elif isinstance(getattr(m, "wq", None), nn.Module) and not isinstance(m.wq, LatentGridWeight):
            raise PqcadError("the quantized teacher has unfrozen weight quantizers; load it with load_quantized")
    if n == 0:  # plain FP module: put every Conv2d/Linear weight on a per-channel max-abs grid
        for m in list(student.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not parametrize.is_parametrized(m, "weight"):
                w = m.weight.detach()
                amax = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-8)
                fq = GridFakeQuant(amax / _qrange(bits)[1], bits, w.dim()).to(w.device)
                with torch.no_grad():
                    m.weight.copy_(fq.integers(w) * fq.delta.reshape(fq._shape))
                parametrize.register_parametrization(m, "weight", fq)
                n += 1
    if n == 0:
        raise PqcadError("the model has no Conv2d/Linear weights to distill")
    student.requires_grad_(False)
    return student


def grid_latents(student: nn.Module) -> list[nn.Parameter]:
    out = []
    for m in student.modules():
        if isinstance(m, LatentGridWeight):
            out.append(m.latent)
        elif parametrize.is_parametrized(m, "weight"):
            out.append(m.parametrizations.weight.original)
    return out


def grid_modules(student: nn.Module) -> list[tuple[nn.Parameter, GridFakeQuant]]:
    """(latent, fake-quant) pairs for every weight on the grid."""
    out = []
    for m in student.modules():
        if isinstance(m, LatentGridWeight):
            out.append((m.latent, m.fq))
        elif parametrize.is_parametrized(m, "weight"):
            out.append((m.parametrizations.weight.original, m.parametrizations.weight[0]))
    return out


def trainable_groups(student: nn.Module, lr: float, lr_act: float, train_fp_params: bool = True,
                     train_act_scales: bool = True) -> list[dict]:
    """Adam parameter groups: grid latents, activation step sizes, other FP parameters (bias, norms)."""
    latents = grid_latents(student)
    scales = [q.scale for q in act_quantizers(student) if getattr(q, "enabled", True)] if train_act_scales else []
    taken = {id(p) for p in latents} | {id(p) for q in act_quantizers(student) for p in q.parameters()}
    others = [p for p in student.parameters() if id(p) not in taken] if train_fp_params else []
    groups = [{"params": latents, "lr": lr, "name": "grid_weights"}] if latents else []
    if scales:
        groups.append({"params": scales, "lr": lr_act, "name": "act_scales"})
    if others:
        groups.append({"params": others, "lr": lr, "name": "fp_params"})
    if not groups:
        raise PqcadError("nothing to train: no grid weights, and FP parameters / activation steps are frozen")
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


@torch.no_grad()
def freeze_student(student: nn.Module) -> nn.Module:
    """Write round(latent/delta) back as int8 integers (frozen WeightQuantizers / exact grid weights), in place."""
    for m in list(student.modules()):
        if isinstance(getattr(m, "wq", None), LatentGridWeight):
            from ..quantize.quantizers import WeightQuantizer

            lg = m.wq
            wq = WeightQuantizer(lg.bits, lg.channel_axis)
            wq.delta = lg.delta.detach().clone()
            wq.prepare_frozen(tuple(lg.latent.shape), lg.latent.device)
            wq.w_int.copy_(lg.w_int)
            m.wq = wq
        elif parametrize.is_parametrized(m, "weight"):
            fq = m.parametrizations.weight[0]
            w = fq.integers(m.parametrizations.weight.original) * fq.delta.reshape(fq._shape)
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            m.weight.copy_(w)
    student.requires_grad_(False)
    return student


def max_grid_error(student: nn.Module) -> float:
    """Largest |w/delta - round(w/delta)| over the student's grid weights (0 when all are on the grid)."""
    err = 0.0
    for latent, fq in grid_modules(student):
        w = fq(latent.detach())
        q = w / fq.delta.reshape(fq._shape)
        err = max(err, float((q - q.round()).abs().max()))
    return err
