"""Fréchet Inception Distance, in float64, with the usual sqrtm safeguards (as pytorch-fid / clean-fid).

Two uses in this project:
  * FID:          candidate samples vs the training set's reference statistics (reference.py).
  * FID-to-FP32:  candidate samples vs the FP32 100-step model's samples generated from the *same* initial noise
                  (sampling.initial_noise with the same seed), as in PCR's QDiffBench. It isolates the damage done
                  by quantization/distillation from the FP model's own distance to the data.
sFID (Nash et al. 2021) is the same distance on the 2023-d mixed_6/conv spatial features
(InceptionFeatures.features(..., spatial=True)): more sensitive to spatial structure than pool3.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.linalg

from ..errors import PqcadError
from .inception import SPATIAL_DIM


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64 from features [N, D]; N >= 2."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2:
        raise PqcadError(f"features must be [N, D], got shape {f.shape}")
    if f.shape[0] < 2:
        raise PqcadError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise PqcadError("features contain NaN/inf")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy >= 1.16 deprecates `disp` and returns only the matrix; older ones return (matrix, err) with disp=False.
    out = scipy.linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, imag_tol: float = 1e-3) -> float:
    """d^2 = |mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).

    If sqrtm is not finite (singular product: fewer samples than dimensions) eps is added to both diagonals;
    a small imaginary part from round-off is dropped; a large one means broken statistics and raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or s1.shape != (d, d) or s2.shape != (d, d):
        raise PqcadError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape} (different feature extractors?)")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise PqcadError("FID statistics contain NaN/inf")
    diff = mu1 - mu2
    covmean = _sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = _sqrtm((s1 + offset).dot(s2 + offset))
        if not np.isfinite(covmean).all():
            raise PqcadError("FID: matrix square root is not finite even after adding eps to the diagonal")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=imag_tol):
            m = float(np.max(np.abs(covmean.imag)))
            raise PqcadError(f"FID: matrix square root has a large imaginary component ({m:.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_stats(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """FID between two (mu, sigma) pairs."""
    return frechet_distance(a[0], a[1], b[0], b[1])


def fid_features_vs_stats(feats, mu2, sigma2) -> float:
    """FID of a feature set [N, D] against (mu, sigma). With N <= D (CPU sample counts) Tr((S1 S2)^1/2) comes from
    the N x N eigenproblem of A S2 A^T (S1 = A^T A; XY and YX share their non-zero eigenvalues): exact, and
    seconds instead of minutes for a 2048 x 2048 sqrtm of a singular product. Larger N: frechet_distance."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] > f.shape[1]:
        return fid_from_stats(feature_stats(f), (mu2, sigma2))
    mu1 = feature_stats(f)[0]  # validates shape, count and finiteness
    mu2, s2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    d = f.shape[1]
    if mu2.shape != (d,) or s2.shape != (d, d):
        raise PqcadError(f"FID statistics do not match: features [{f.shape[0]}, {d}] vs mu {mu2.shape}, "
                         f"sigma {s2.shape} (different feature extractors?)")
    if not (np.isfinite(mu2).all() and np.isfinite(s2).all()):
        raise PqcadError("FID statistics contain NaN/inf")
    return _fid_lowrank(f, mu1, mu2, s2)


def _fid_lowrank(f: np.ndarray, mu1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    a = (f - mu1) / np.sqrt(f.shape[0] - 1)
    m = a @ s2 @ a.T
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff.dot(diff) + (a * a).sum() + np.trace(s2) - 2.0 * tr_sqrt)


def fid_from_features(feats_a, feats_b) -> float:
    """FID between two feature sets [N, D] (e.g. candidate vs FP32 samples from the same noise: FID-to-FP32)."""
    return fid_from_stats(feature_stats(feats_a), feature_stats(feats_b))


def sfid_from_features(spatial_a, spatial_b, expect_dim: Optional[int] = SPATIAL_DIM) -> float:
    """sFID: Fréchet distance between two sets of spatial features [N, 2023] (InceptionFeatures spatial=True).

    expect_dim guards against passing pool3 (2048-d) features by mistake; None accepts any width.
    """
    for name, f in (("first", spatial_a), ("second", spatial_b)):
        shape = np.shape(f)
        if expect_dim is not None and (len(shape) != 2 or shape[1] != expect_dim):
            raise PqcadError(f"sFID needs spatial features [N, {expect_dim}], {name} set has shape {shape} "
                             f"(pool3 features? use features(..., spatial=True))")
    return fid_from_features(spatial_a, spatial_b)
