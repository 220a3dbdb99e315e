"""Bit-shrinking baseline (Lin et al., CVPR 2023): lower the weight bit width in fixed, equal cycles from
tau = 2 kappa down to kappa, each stage initialised from the previous stage's soft-quantised weights.
Unlike PQ there is no loss-driven transition: the cycle length is fixed in advance."""

from __future__ import annotations

from typing import Any

from .progressive import tau_bits
from .config import Method
from .schedules import register_schedule
from .unit_optimizer import UnitContext


def stage_bits(kappa: list[int], stages: int = 0) -> list[list[int]]:
    """Per-stage bit widths per layer: one stage per bit (stages=0) or `stages` evenly spaced ones."""
    tau = [tau_bits(k) for k in kappa]
    n = stages or max(t - k for t, k in zip(tau, kappa)) + 1
    n = max(n, 2)
    return [[t - round(s * (t - k) / (n - 1)) for t, k in zip(tau, kappa)] for s in range(n)]


@register_schedule(Method.BITSHRINK)
def bitshrink_schedule(ctx: UnitContext) -> dict[str, Any]:
    plan = stage_bits(ctx.final_bits, ctx.cfg.bitshrink_stages)
    budget = ctx.cfg.iters
    bounds = [round(i * budget / len(plan)) for i in range(len(plan) + 1)]
    ctx.init_weights(plan[0])
    starts = []
    for s, bits in enumerate(plan):
        if s > 0:
            ctx.transition(bits, "cycle")
        starts.append(ctx.iteration)
        ctx.segment(bounds[s + 1] - bounds[s], regularize=True, label=f"b{max(bits)}")
    return {"bits_start": plan[0], "stages": plan, "stage_starts": starts,
            "transition_iter": starts[-1] if len(starts) > 1 else None, "transition": "cycle"}
