"""Registries of weight schedules (methods) and reconstruction losses, and the `direct` schedule.

A schedule is `fn(ctx: UnitContext) -> dict` (log fields of the unit) that drives the unit optimiser through
`init_weights` / `segment` / `transition`; it registers with `@register_schedule(Method.X)` (progressive.py,
bitshrink.py, floor.py). A loss is a `UnitContext` subclass whose `rec_loss` it defines, registered with
`@register_loss(ReconLoss.X)` (unit_optimizer.py: block, fbr.py: fbr). The modules register on import; the driver
imports them all. This module imports none of them, so there is no circle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..config_base import parse_choice
from ..errors import UsageError
from .config import Method, ReconLoss

if TYPE_CHECKING:  # annotations only: unit_optimizer.py imports this module
    from .unit_optimizer import UnitContext

Schedule = Callable[["UnitContext"], dict[str, Any]]
SCHEDULES: dict[str, Schedule] = {}
LOSSES: dict[str, type] = {}


def register_schedule(method: Method, learns: bool = True) -> Callable[[Schedule], Schedule]:
    """Register `fn` as the schedule of `method`; `learns=False`: the driver skips the LSQ phase too."""
    def deco(fn: Schedule) -> Schedule:
        fn.learns = learns
        SCHEDULES[Method(method).value] = fn
        return fn
    return deco


def get_schedule(method: Method | str) -> Schedule:
    m = parse_choice(Method, method, "--method")
    if m.value not in SCHEDULES:
        raise UsageError(f"method '{m.value}' has no registered schedule")
    return SCHEDULES[m.value]


def register_loss(loss: ReconLoss) -> Callable[[type], type]:
    """Register a `UnitContext` subclass as the reconstruction loss `loss`."""
    def deco(cls: type) -> type:
        LOSSES[ReconLoss(loss).value] = cls
        return cls
    return deco


def get_loss_context(loss: ReconLoss | str) -> type:
    name = parse_choice(ReconLoss, loss, "--recon-loss").value
    if name not in LOSSES:
        raise UsageError(f"reconstruction loss '{name}' is not registered")
    return LOSSES[name]


@register_schedule(Method.DIRECT)
def direct_schedule(ctx: "UnitContext") -> dict[str, Any]:
    """Plain AdaRound at the final bits for the whole budget (Q-Diffusion / BRECQ)."""
    ctx.init_weights(ctx.final_bits)
    ctx.segment(ctx.cfg.iters, regularize=True, label="w")
    return {"bits_start": ctx.final_bits, "transition_iter": None}
