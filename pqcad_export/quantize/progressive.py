"""Progressive Quantization (PQ, paper Sec. III / Alg. 2-3): weights first at tau = 2 kappa bits, then kappa.

The move from tau to kappa is triggered by a momentum transition detector (Alg. 3) on the reconstruction loss;
the kappa quantizer is initialised from the tau-optimised soft-quantised weights (not the FP weights). If the
detector has not fired by `force_fraction` of the budget the transition is forced (and logged as forced).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional

from .config import Method
from .schedules import register_schedule
from .unit_optimizer import UnitContext


class TransitionDetector:
    """Alg. 3: keep the last W losses; G <- beta*G + (1-beta)*loss; rate = |L_avg - G| / max(L_avg, eps);
    fire when the window is full and rate < pi. G starts at the first loss."""

    def __init__(self, pi: float = 0.04, beta: float = 0.9, eps: float = 1e-8, window: int = 500):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.pi, self.beta, self.eps, self.window = pi, beta, eps, int(window)
        self.losses: deque[float] = deque(maxlen=self.window)
        self.G: Optional[float] = None
        self.rate: Optional[float] = None
        self.steps = 0
        self.fired_at: Optional[int] = None

    def update(self, loss: float) -> bool:
        """Feed one iteration's loss; True when the transition should happen now."""
        loss = float(loss)
        self.steps += 1
        self.losses.append(loss)
        self.G = loss if self.G is None else self.beta * self.G + (1 - self.beta) * loss
        l_avg = sum(self.losses) / len(self.losses)
        self.rate = abs(l_avg - self.G) / max(l_avg, self.eps)
        fire = len(self.losses) == self.window and self.rate < self.pi
        if fire and self.fired_at is None:
            self.fired_at = self.steps - 1
        return fire


def tau_bits(kappa: int) -> int:
    """tau = 2 kappa, capped at 16."""
    return min(2 * int(kappa), 16)


@register_schedule(Method.PQ)
def pq_schedule(ctx: UnitContext) -> dict[str, Any]:
    """Alg. 2: AdaRound at tau bits until the detector fires (or the forced fraction), then kappa."""
    cfg, pq = ctx.cfg, ctx.cfg.pq
    kappa = ctx.final_bits
    tau = [tau_bits(k) for k in kappa]
    budget = cfg.iters
    max_tau = max(1, min(budget - 1, int(round(pq.force_fraction * budget))))
    det = TransitionDetector(pq.pi, pq.beta, pq.eps, pq.window)
    ctx.init_weights(tau)
    n_tau = ctx.segment(max_tau, regularize=True, detector=det, label="tau")
    curve = ctx.loss_curve()
    tail = curve[-min(len(curve), max(1, pq.window // 10)):]
    loss_tau = sum(tail) / len(tail) if tail else None
    fired = det.fired_at is not None
    ctx.transition(kappa, "detector" if fired else "forced")
    if not fired:
        ctx.events[-1]["note"] = f"forced at {pq.force_fraction:.0%} of the budget"
    n_kappa_start = len(curve)
    ctx.segment(budget - n_tau, regularize=True, label="k")
    curve = ctx.loss_curve()
    head = curve[n_kappa_start:n_kappa_start + max(1, pq.window // 10)]
    tail_k = curve[-min(len(curve) - n_kappa_start, max(1, pq.window // 10)):]
    return {"bits_start": tau, "transition_iter": n_tau, "transition": "detector" if fired else "forced",
            "detector_rate": det.rate, "loss_tau": loss_tau,
            "loss_kappa_start": sum(head) / len(head) if head else None,
            "loss_kappa_end": sum(tail_k) / len(tail_k) if tail_k else None}


def delta_pert(pq_log: dict, direct_log: dict) -> Optional[float]:
    """Delta_Pert = 1 - geomean_b(P_pq(b) / P_direct(b)) over blocks both logs share (positive: PQ better)."""
    a = {u["name"]: u["pert"] for u in pq_log["units"]}
    b = {u["name"]: u["pert"] for u in direct_log["units"]}
    ratios = [max(a[n], 1e-30) / max(b[n], 1e-30) for n in a if n in b]
    if not ratios:
        return None
    return 1 - math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def plot_loss_curve(log: dict, out_png, unit: Optional[str] = None) -> Optional[str]:
    """PNG of one block's per-iteration reconstruction loss through the tau -> kappa transition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = [u for u in log["units"] if u.get("curve")]
    if unit is not None:
        units = [u for u in units if u["name"] == unit] or units
    with_t = [u for u in units if u.get("transition_iter") is not None]
    if not units:
        return None
    u = (with_t or units)[0] if unit is None else units[0]
    stride = u.get("curve_stride", 1)
    xs = [i * stride for i in range(len(u["curve"]))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, u["curve"], lw=0.8, label="reconstruction loss")
    if u.get("transition_iter") is not None:
        ax.axvline(u["transition_iter"], color="r", ls="--",
                   label=f"tau->kappa ({u.get('transition', '')}) @ {u['transition_iter']}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(f"{u['name']}: {log.get('method')} {log.get('bits')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return u["name"]
