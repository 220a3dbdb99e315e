"""Round-to-nearest (RTN) + MSE-scale state of a block: the `rtn` method, and the floor under learned quantization.

Learning (AdaRound / PQ / LSQ) starts from RTN weights with MSE per-channel steps and MSE-clipped activation
steps. On a block where it diverges or over-fits the calibration rows it can end worse than that start; the floor
measures both on held-out calibration rows (never used for training or scale search) and keeps the better one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import Method
from .schedules import register_schedule


def _nearest_alpha(m) -> torch.Tensor:
    """AdaRound alpha whose hard rounding (floor + [alpha >= 0]) equals round-to-nearest exactly."""
    d = m.wq.delta.reshape(m.wq._bshape(m.w_fp))
    v = m.w_fp / d
    return torch.where(torch.round(v) > torch.floor(v), 1.0, -1.0).to(m.w_fp.dtype)


def set_nearest(ctx) -> None:
    """Weights at their final bits, MSE steps, hard rounding == round-to-nearest (no learning)."""
    ctx.init_weights(ctx.final_bits, mode="nearest")
    for m in ctx.layers:
        m.wq.alpha = nn.Parameter(_nearest_alpha(m), requires_grad=True)
        m.wq.mode = "hard"


@dataclass
class RtnState:
    weights: list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]]  # (w_fp, delta, bits, alpha)
    act_scales: list[torch.Tensor]


@torch.no_grad()
def snapshot(ctx, act_quantizers: list) -> RtnState:
    ws = [(m.w_fp.clone(), m.wq.delta.clone(), m.wq.bits, _nearest_alpha(m)) for m in ctx.layers]
    return RtnState(ws, [q.scale.detach().clone() for q in act_quantizers])


@torch.no_grad()
def restore(ctx, state: RtnState, act_quantizers: list) -> None:
    for m, (w, d, b, a) in zip(ctx.layers, state.weights):
        m.w_fp.copy_(w)
        m.wq.bits = b
        m.wq.delta = d.clone()
        m.wq.alpha = nn.Parameter(a.clone(), requires_grad=True)
        m.wq.mode = "hard"
    for q, s in zip(act_quantizers, state.act_scales):
        q.scale.data = s.clone()


@register_schedule(Method.RTN, learns=False)  # the driver skips the LSQ phase
def rtn_schedule(ctx) -> dict[str, Any]:
    """Method `rtn`: round-to-nearest + MSE scales, nothing learned (activation steps are not optimised either)."""
    set_nearest(ctx)
    return {"bits_start": ctx.final_bits, "transition_iter": None}
