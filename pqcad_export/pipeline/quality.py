"""compare's quality numbers beyond FID: which data statistics to score against, KID (vs the data and vs the FP32
samples) and paired PSNR / SSIM / MSE to the FP32 100-step images from the same noise.

Reference data, first found wins: --ref-stats (a refstats folder, or an .npz with mu/sigma[/features]),
--ref-images (computed once, cached by content), the shipped Fashion-MNIST asset (built-in teacher only), the
content-keyed FID cache of Fashion-MNIST (older reference_stats files: mu/sigma only). Otherwise `fid` and `kid`
are null and a note says how to get them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import PqcadError
from ..metrics.refstats import BUILTIN_DIR, RefStats, load_refstats

KID_SUBSETS = 100


def _from_npz(p: Path, ext_id: str) -> RefStats:
    try:
        with np.load(p, allow_pickle=False) as d:
            mu, sigma = d["mu"].astype(np.float64), d["sigma"].astype(np.float64)
            feats = d["features"].astype(np.float64) if "features" in d.files else None
            count = int(d["count"]) if "count" in d.files else -1
    except Exception as exc:
        raise PqcadError(f"--ref-stats {p}: not an .npz with mu and sigma ({type(exc).__name__}: {exc})") from None
    return RefStats(mu, sigma, count, feats, None, ext_id, {"source": str(p)}, p)


def resolve_reference(cfg, extractor, builtin_teacher: bool, sample_shape, notes: list[str],
                      progress: bool = False) -> Optional[RefStats]:
    """The data statistics this compare scores `fid` / `kid` against, or None with a note."""
    if cfg.ref_stats:
        p = Path(cfg.ref_stats)
        if p.is_dir() or p.name.startswith("refstats."):
            return _check_extractor(load_refstats(p), extractor, notes)
        if not p.is_file():
            raise PqcadError(f"--ref-stats file not found: {p}")
        return _from_npz(p, extractor.id)
    if getattr(cfg, "ref_images", None):
        from ..metrics.refstats import cached_refstats, read_ref_images

        c, h, _ = sample_shape
        imgs = read_ref_images(cfg.ref_images, size=h, channels=c)
        rs = cached_refstats(imgs, extractor, progress=progress)
        rs.meta.setdefault("source", cfg.ref_images)
        return rs
    if builtin_teacher and (BUILTIN_DIR / "refstats.json").is_file():
        return _check_extractor(load_refstats(BUILTIN_DIR), extractor, notes)
    legacy = _legacy_cache(extractor, notes)
    if legacy is not None:
        return legacy
    notes.append("fid, kid: no reference statistics for this model's data; pass --ref-images DIR (a folder of "
                 "training images or an .npy/.npz array; computed once and cached) or --ref-stats")
    return None


def _check_extractor(rs: RefStats, extractor, notes: list[str]) -> Optional[RefStats]:
    if rs.extractor_id != extractor.id:
        notes.append(f"fid, kid: reference statistics at {rs.path} were made with feature extractor "
                     f"{rs.extractor_id}, not {extractor.id}: not used")
        return None
    return rs


def _legacy_cache(extractor, notes: list[str]) -> Optional[RefStats]:
    from ..data import load_images
    from ..metrics.reference import content_key, default_cache_dir

    try:
        imgs = load_images(None, size=32, channels=1)
    except PqcadError:
        return None
    p = default_cache_dir() / f"ref-{content_key(imgs, extractor.id)[:32]}.npz"
    if not p.is_file():
        return None
    rs = _from_npz(p, extractor.id)
    rs.meta["source"] = "fashion-mnist (FID cache)"
    return rs


def _r(v: Optional[float], nd: int = 6) -> Optional[float]:
    return None if v is None else round(float(v), nd)


def score_quality(feats: dict[str, np.ndarray], images: dict, reference: dict[str, Any], cands: list[dict],
                  ref: Optional[RefStats], notes: list[str], seed: int) -> dict[str, Any]:
    """Fill kid, kid_std, kid_to_fp32(_std), psnr_to_fp32, ssim_to_fp32, mse_to_fp32 (and the per-pair MSE used
    by the sample grid); returns the report's top-level `quality` description."""
    from ..metrics.kid import kid_from_features, kid_paired
    from ..metrics.paired import paired_metrics

    info: dict[str, Any] = {"kid_subsets": KID_SUBSETS, "kid_kernel": "polynomial (x.y/d + 1)^3, unbiased MMD^2",
                            "kid_to_fp32": "paired estimator: same rows of both sets, matched pairs left out",
                            "paired": "PSNR (dB, mean over pairs, peak 1) and SSIM (11x11 Gaussian) of each image "
                                      "vs the FP32 100-step image from the same noise"}
    data = ref.features if ref is not None else None
    if ref is not None:
        info["reference_data"] = {k: ref.meta.get(k) for k in ("source", "command", "sha256", "subset")
                                  if ref.meta.get(k) is not None}
        info["reference_data"]["count"] = ref.count
    if ref is not None and data is None:
        notes.append("kid: the reference statistics hold no feature subset (mu/sigma only); kid is null")
    fp = feats["reference"]
    try:
        if data is not None:
            k = kid_from_features(data, fp, KID_SUBSETS, _subset(data, fp), seed)
            reference["kid"], reference["kid_std"] = _r(k.kid), _r(k.kid_std)
        reference["kid_to_fp32"], reference["ssim_to_fp32"] = 0.0, 1.0
        for e in cands:
            f = feats[e["name"]]
            if data is not None:
                k = kid_from_features(data, f, KID_SUBSETS, _subset(data, f), seed)
                e["kid"], e["kid_std"] = _r(k.kid), _r(k.kid_std)
            k = kid_paired(f, fp, KID_SUBSETS, _subset(fp, f), seed)  # same noise: paired estimator
            e["kid_to_fp32"], e["kid_to_fp32_std"] = _r(k.kid), _r(k.kid_std)
            info["kid_subset_size"] = k.subset_size
            p = paired_metrics(images[e["name"]], images["reference"])
            e["psnr_to_fp32"], e["ssim_to_fp32"], e["mse_to_fp32"] = _r(p.psnr, 3), _r(p.ssim, 4), _r(p.mse, 6)
            e["_pair_mse"] = p.per_pair_mse
    except PqcadError as exc:  # e.g. torchmetrics missing on the measurement machine: null with the reason
        notes.append(f"kid, psnr_to_fp32, ssim_to_fp32: {exc}")
    if len(fp) < 2000:
        notes.append(f"kid/kid_to_fp32: mean and std over {KID_SUBSETS} subsets of half the {len(fp)} samples; "
                     "unbiased, so comparable across sample counts, unlike fid")
    return info


def _subset(a: np.ndarray, b: np.ndarray) -> int:
    """min(1000, half the smaller set): subsets that differ, so kid_std is a spread and not 0."""
    return max(2, min(1000, min(len(a), len(b)) // 2))
