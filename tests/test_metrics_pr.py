"""Improved precision/recall (k-NN manifolds): constructed sets, chunking, a brute-force reference, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pqcad_export.errors import PqcadError
from pqcad_export.metrics import PrecisionRecall, knn_radii, precision_recall


def _reference_pr(real, fake, k=3):
    """Straight numpy transcription of Kynkäänniemi et al.'s algorithm (full distance matrices)."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.partition(dist(real, real), k, axis=1)[:, k]
    r_fake = np.partition(dist(fake, fake), k, axis=1)[:, k]
    precision = (dist(fake, real) <= r_real[None, :]).any(1).mean()
    recall = (dist(real, fake) <= r_fake[None, :]).any(1).mean()
    return precision, recall


def test_identical_sets_are_perfect():
    a = np.random.default_rng(0).normal(size=(200, 32))
    pr = precision_recall(a, a.copy(), k=3)
    assert isinstance(pr, PrecisionRecall) and pr == (1.0, 1.0)
    p, r = precision_recall(torch.from_numpy(a).float(), torch.from_numpy(a).float(), dtype=torch.float32)
    assert (p, r) == (1.0, 1.0)


def test_disjoint_far_sets_are_zero():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(150, 16)), rng.normal(size=(120, 16)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_collapsed_fake_inside_real_has_precision_not_recall():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 8))
    fake = 0.05 * rng.normal(size=(300, 8))  # all samples in the densest part: realistic but no coverage
    p, r = precision_recall(real, fake)
    assert p == 1.0 and r < 0.2


@pytest.mark.parametrize("chunk_elems", [1, 37, 1 << 24])
def test_matches_bruteforce_reference_for_any_chunking(chunk_elems):
    rng = np.random.default_rng(3)
    real = rng.normal(size=(90, 6))
    fake = 1.2 * rng.normal(size=(70, 6)) + 0.6  # partial overlap: both numbers strictly inside (0, 1)
    want = _reference_pr(real, fake, k=3)
    got = precision_recall(real, fake, k=3, chunk_elems=chunk_elems)
    assert 0.0 < got.precision < 1.0 and 0.0 < got.recall < 1.0
    assert got == pytest.approx(want, abs=1e-12)
    assert precision_recall(real, fake, k=5, chunk_elems=chunk_elems) == pytest.approx(_reference_pr(real, fake, 5))


def test_knn_radii_excludes_self():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]], dtype=torch.float64)
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 3.0, 4.0]
    assert knn_radii(x, k=2, chunk_elems=1).tolist() == [3.0, 2.0, 3.0, 4.0, 7.0]


def test_bad_inputs_raise_pqcad_error():
    a = np.zeros((10, 4))
    with pytest.raises(PqcadError, match="differ in width"):
        precision_recall(a, np.zeros((10, 5)))
    with pytest.raises(PqcadError, match="more than 3"):
        precision_recall(a, np.zeros((3, 4)))
    with pytest.raises(PqcadError, match="positive integer"):
        precision_recall(a, a, k=0)
    with pytest.raises(PqcadError, match=r"\[N, D\]"):
        precision_recall(np.zeros(10), a)
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(PqcadError, match="NaN"):
        precision_recall(bad, a)
