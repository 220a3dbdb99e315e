"""Calibration losses between a batch of student outputs and the C_DC samples of the matching step.

The second term of Eq. (8) (arXiv 2506.16776) pulls the *distribution* of what the quantized student produces
towards the full-precision calibration set C_DC. Student batch and C_DC batch are unpaired sets (different
sizes allowed), so every loss here is a distance between two empirical distributions, invariant to the order of
the samples, zero for identical inputs and differentiable w.r.t. the student batch.

* ``em``   exact Earth-Mover distance (POT ``ot.emd2``) with uniform weights on the pairwise cost matrix
           ``C_ij = ||x_i - y_j||^2 / D`` (squared Euclidean per element, D = C*H*W), i.e. W2^2 per element, so it
           lives on the same scale as the MSE distillation term. Gradients flow through C (the optimal plan is
           treated as constant, as POT does: envelope theorem).
* ``swd``  sliced Wasserstein (POT ``ot.sliced_wasserstein_distance``, p=2, squared): O(n log n) per projection,
           for batches too large for the exact LP. Projections come from a seeded torch generator so a resumed
           run draws the same directions (POT's own ``seed=`` would reseed torch's *global* RNG).
* ``kl``   KL(P_student || P_cdc) between soft (Gaussian-kernel) histograms of all flattened values.
* ``jsd``  Jensen-Shannon divergence between the same histograms (symmetric, bounded by log 2).
* ``cos``  1 - cosine similarity of the two batch means (flattened): matches the mean "direction" only.
* ``none`` 0 (plain progressive distillation, the paper's ablation without calibration data).
"""

from __future__ import annotations

from typing import Callable, Optional

import ot
import torch

from ..config_base import choices
from ..errors import UsageError
from .choices import CalibLoss

LOSSES = tuple(choices(CalibLoss))  # ("em", "swd", "kl", "jsd", "cos", "none")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def _check(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = _flat(x), _flat(y).to(x.device)
    if xs.shape[1] != ys.shape[1]:
        raise UsageError(f"calibration loss: sample sizes differ ({tuple(x.shape[1:])} vs {tuple(y.shape[1:])})")
    if xs.shape[0] == 0 or ys.shape[0] == 0:
        raise UsageError("calibration loss: empty batch")
    return xs, ys


def em_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact EM distance (uniform weights) with per-element squared-Euclidean ground cost; see module doc."""
    xs, ys = _check(x, y)
    cost = ot.dist(xs, ys, metric="sqeuclidean") / xs.shape[1]
    cost = cost.clamp_min(0)  # ot.dist's expansion can go slightly negative in float32
    a = torch.full((xs.shape[0],), 1.0 / xs.shape[0], dtype=cost.dtype, device=cost.device)
    b = torch.full((ys.shape[0],), 1.0 / ys.shape[0], dtype=cost.dtype, device=cost.device)
    return ot.emd2(a, b, cost)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 64,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Squared sliced W2 on unit-sphere projections; ~= em_distance's per-element scale for isotropic data."""
    xs, ys = _check(x, y)
    proj = torch.randn((xs.shape[1], n_projections), generator=generator, dtype=torch.float32)
    proj = (proj / proj.norm(dim=0, keepdim=True)).to(xs.device)
    return ot.sliced_wasserstein_distance(xs, ys, projections=proj, p=2) ** 2


def soft_histogram(v: torch.Tensor, lo: float, hi: float, bins: int = 64) -> torch.Tensor:
    """Differentiable histogram of all values of v: Gaussian kernels (bandwidth = bin width) on `bins` centres."""
    centres = torch.linspace(lo, hi, bins, device=v.device, dtype=torch.float32)
    width = (hi - lo) / max(bins - 1, 1)
    d = (v.reshape(-1, 1).float() - centres.reshape(1, -1)) / width
    h = torch.exp(-0.5 * d * d).sum(0)
    return h / h.sum().clamp_min(1e-30)


def _histograms(x: torch.Tensor, y: torch.Tensor, bins: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = _check(x, y)
    with torch.no_grad():  # fixed support from both sets (no gradient through the bin placement)
        lo = float(torch.minimum(xs.min(), ys.min()))
        hi = float(torch.maximum(xs.max(), ys.max()))
        if hi - lo < 1e-6:
            lo, hi = lo - 1.0, hi + 1.0
    p = soft_histogram(xs, lo, hi, bins) + eps
    q = soft_histogram(ys, lo, hi, bins) + eps
    return p / p.sum(), q / q.sum()


def kl_divergence(x: torch.Tensor, y: torch.Tensor, bins: int = 64, eps: float = 1e-8) -> torch.Tensor:
    """KL(P_x || P_y) between soft histograms of the flattened values of the two batches."""
    p, q = _histograms(x, y, bins, eps)
    return (p * (p.log() - q.log())).sum().clamp_min(0)


def js_divergence(x: torch.Tensor, y: torch.Tensor, bins: int = 64, eps: float = 1e-8) -> torch.Tensor:
    """Jensen-Shannon divergence between soft histograms of the flattened values (in nats, <= log 2)."""
    p, q = _histograms(x, y, bins, eps)
    m = 0.5 * (p + q)
    return (0.5 * (p * (p.log() - m.log())).sum() + 0.5 * (q * (q.log() - m.log())).sum()).clamp_min(0)


def cosine_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - cos(mean_x, mean_y) of the flattened batch means."""
    xs, ys = _check(x, y)
    return 1.0 - torch.nn.functional.cosine_similarity(xs.mean(0), ys.mean(0), dim=0, eps=1e-12)


def no_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.sum() * 0.0


def calibration_loss(name: str, **kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function `f(student_batch, cdc_batch) -> scalar` for a --calib-loss name."""
    if name == "em":
        return em_distance
    if name == "swd":
        return lambda x, y: sliced_wasserstein(x, y, kwargs.get("n_projections", 64), kwargs.get("generator"))
    if name == "kl":
        return lambda x, y: kl_divergence(x, y, kwargs.get("bins", 64))
    if name == "jsd":
        return lambda x, y: js_divergence(x, y, kwargs.get("bins", 64))
    if name == "cos":
        return cosine_loss
    if name == "none":
        return no_loss
    raise UsageError(f"unknown calibration loss '{name}': expected one of {', '.join(LOSSES)}")
