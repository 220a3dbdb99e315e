"""Calibration rows on the device, and the inputs / FP targets of one reconstruction unit captured by hooks."""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional

import torch
from torch import nn

from ..errors import PqcadError
from .blocks import Unit, call_unet, first_tensor


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


def slices(n: int, bs: int):
    """Consecutive slices of at most `bs` rows covering `n`."""
    for i in range(0, n, bs):
        yield slice(i, min(i + bs, n))


def calib_batch(calib: dict[str, torch.Tensor], sl) -> dict[str, torch.Tensor]:
    """The rows `sl` of every calibration tensor."""
    return {k: v[sl] for k, v in calib.items()}


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
        for sl in slices(calib["sample"].shape[0], bs):
            try:
                call_unet(model, calib_batch(calib, sl))
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
        for sl in slices(calib["sample"].shape[0], bs):
            batch = calib_batch(calib, sl)
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
