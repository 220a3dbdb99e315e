"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets, with its standard deviation over the subsets.

Why next to FID: KID's estimator is unbiased, so at CPU sample counts (100 images) it is centred on the true value
and comparable across sample sizes, where FID is biased upwards by an amount that depends on N.

The computation is torchmetrics' KernelInceptionDistance fed with the project's own TF-Inception pool3 features
(an identity "feature extractor"), so FID and KID come from the same 2048-d vectors. Subsets are drawn from a
seeded generator inside a forked RNG: the same features always give the same KID, and the global RNG is untouched.
torchmetrics is imported lazily: the metrics package stays importable where it is not installed (GPU machine).

Paired sets (a candidate's images and the FP32 images from the same noise: kid_to_fp32) break the independence the
usual estimator assumes: its cross term includes k(x_i, y_i) of matched pairs, which are close by construction,
so the estimate drifts below zero. kid_paired draws the same rows from both sets and leaves the i = j terms out
of all three sums (the complete U-statistic MMD^2_u of Gretton et al. 2012), which is unbiased for paired data.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..errors import PqcadError

DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000  # torchmetrics' and clean-fid's default; capped by the smaller set


class KidResult(NamedTuple):
    kid: float
    kid_std: float
    subset_size: int
    subsets: int


def _as_tensor(x, name: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise PqcadError(f"KID: {name} features must be [N, D], got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise PqcadError(f"KID: {name} features contain NaN/inf")
    return t


def kid_from_features(real, fake, subsets: int = DEFAULT_SUBSETS, subset_size: Optional[int] = None,
                      seed: int = 0) -> KidResult:
    """KID of two feature sets [N, D] (float64): mean and population std of MMD^2_u over `subsets` subsets of
    `subset_size` rows (default min(1000, N_real, N_fake)). Needs at least 2 rows in each set."""
    try:
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:
        raise PqcadError("KID needs torchmetrics (pip install 'torchmetrics>=1.4,<2')") from None
    r, f = _as_tensor(real, "real"), _as_tensor(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise PqcadError(f"KID: feature widths differ ({r.shape[1]} vs {f.shape[1]}): different extractors?")
    m = min(DEFAULT_SUBSET_SIZE if subset_size is None else int(subset_size), r.shape[0], f.shape[0])
    if m < 2:
        raise PqcadError(f"KID needs at least 2 feature vectors per set, got {r.shape[0]} and {f.shape[0]}")
    if int(subsets) < 1:
        raise PqcadError(f"KID subsets must be >= 1, got {subsets}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer": intended here
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=int(subsets), subset_size=m)
    metric.update(r, real=True)
    metric.update(f, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mean, std = metric.compute()
    return KidResult(float(mean), float(std), m, int(subsets))


def kid_paired(a, b, subsets: int = DEFAULT_SUBSETS, subset_size: Optional[int] = None, seed: int = 0) -> KidResult:
    """KID of two paired feature sets (row i of `a` and of `b` from the same noise): the same rows from both in
    each subset, and no i = j terms (see the module doc). Same kernel and defaults as kid_from_features."""
    try:
        from torchmetrics.image.kid import poly_kernel
    except ImportError:
        raise PqcadError("KID needs torchmetrics (pip install 'torchmetrics>=1.4,<2')") from None
    x, y = _as_tensor(a, "first"), _as_tensor(b, "second")
    if x.shape != y.shape:
        raise PqcadError(f"paired KID needs sets of the same shape (same noise), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    m = min(DEFAULT_SUBSET_SIZE if subset_size is None else int(subset_size), x.shape[0])
    if m < 2 or int(subsets) < 1:
        raise PqcadError(f"paired KID needs subsets >= 1 of at least 2 rows, got {subsets} of {m}")
    g = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(int(subsets)):
        idx = torch.randperm(x.shape[0], generator=g)[:m]
        xs, ys = x[idx], y[idx]
        k = poly_kernel(xs, xs) + poly_kernel(ys, ys) - poly_kernel(xs, ys) - poly_kernel(ys, xs)
        vals.append((k.sum() - torch.diagonal(k).sum()) / (m * (m - 1)))
    v = torch.stack(vals)
    return KidResult(float(v.mean()), float(v.std(unbiased=False)), m, int(subsets))
