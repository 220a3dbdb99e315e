"""Improved precision and recall (Kynkäänniemi et al. 2019): k-NN manifolds of feature sets.

Each set's manifold is the union of balls around its points whose radius is the distance to the point's k-th
nearest neighbour in the same set (self excluded). Precision = share of fake points inside the real manifold
(are the samples realistic?); recall = share of real points inside the fake manifold (do the samples cover the
data?). Distances are computed with torch.cdist in row chunks, so 10k x 10k (or larger) sets fit in memory:
peak is about `chunk_elems` distances plus the inputs.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np
import torch

from ..errors import PqcadError

DEFAULT_CHUNK_ELEMS = 1 << 24  # 16M distances per chunk: 128 MB in float64


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _as_feats(x, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise PqcadError(f"{name} features must be [N, D], got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise PqcadError(f"{name} features must be numeric, got {t.dtype}")
    t = t.to(device=device, dtype=dtype)
    if not torch.isfinite(t).all():
        raise PqcadError(f"{name} features contain NaN/inf")
    return t


def _rows_per_chunk(n_cols: int, chunk_elems: int) -> int:
    return max(1, int(chunk_elems) // max(1, n_cols))


def knn_radii(feats: torch.Tensor, k: int = 3, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> torch.Tensor:
    """Distance from each row to its k-th nearest neighbour among the other rows ([N]); needs N > k."""
    n = feats.shape[0]
    if n <= k:
        raise PqcadError(f"k-NN manifold with k={k} needs more than {k} feature vectors, got {n}")
    out = torch.empty(n, dtype=feats.dtype, device=feats.device)
    step = _rows_per_chunk(n, chunk_elems)
    for r0 in range(0, n, step):
        d = torch.cdist(feats[r0:r0 + step], feats)
        # k+1 smallest includes the point itself (distance ~0); the (k+1)-th is the k-th neighbour, as in the
        # reference implementation (np.partition(d, k)[:, k]).
        out[r0:r0 + step] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def inside_manifold(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor,
                    chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> torch.Tensor:
    """Bool [M]: query j lies in some ball (|q_j - m_i| <= radii_i) of the manifold."""
    out = torch.empty(queries.shape[0], dtype=torch.bool, device=queries.device)
    step = _rows_per_chunk(manifold.shape[0], chunk_elems)
    for q0 in range(0, queries.shape[0], step):
        d = torch.cdist(queries[q0:q0 + step], manifold)
        out[q0:q0 + step] = (d <= radii.unsqueeze(0)).any(dim=1)
    return out


def precision_recall(real_feats, fake_feats, k: int = 3, device: Union[str, torch.device, None] = None,
                     dtype: torch.dtype = torch.float64,
                     chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> PrecisionRecall:
    """Improved precision/recall of fake vs real features ([N, D] arrays or tensors, e.g. pool3), k=3 as published.

    device: where distances are computed (default CPU; 'cuda' for 10k+ sets). dtype float64 by default so that
    the matrix-product form of cdist does not blur the <= radius tests; float32 is ~2x faster and fine on GPU.
    Use the same number of real and fake samples (the paper's protocol); values are in [0, 1].
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise PqcadError(f"precision/recall k must be a positive integer, got {k!r}")
    if int(chunk_elems) < 1:
        raise PqcadError(f"chunk_elems must be >= 1, got {chunk_elems}")
    dev = torch.device(device if device is not None else "cpu")
    real = _as_feats(real_feats, "real", dtype, dev)
    fake = _as_feats(fake_feats, "fake", dtype, dev)
    if real.shape[1] != fake.shape[1]:
        raise PqcadError(f"real and fake features differ in width: {real.shape[1]} vs {fake.shape[1]} "
                         f"(different feature extractors?)")
    with torch.no_grad():
        real_r = knn_radii(real, int(k), chunk_elems)
        fake_r = knn_radii(fake, int(k), chunk_elems)
        precision = inside_manifold(real, real_r, fake, chunk_elems).double().mean().item()
        recall = inside_manifold(fake, fake_r, real, chunk_elems).double().mean().item()
    return PrecisionRecall(float(precision), float(recall))
