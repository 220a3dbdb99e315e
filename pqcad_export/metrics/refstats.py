"""Reference statistics of a data set for FID and KID: mu, sigma of all images' TF-Inception pool3 features plus a
fixed seeded subset of the features themselves (KID needs samples, not moments).

On disk: a folder with `refstats.npz` and a `refstats.json` sidecar (command that made it, image count, extractor
id, sha256 of the npz, verified on load). sigma is symmetric: its diagonal is kept in float64 (it sets the trace
term of FID exactly) and the strict upper triangle in `sigma_dtype` (float16 for the shipped asset, which keeps it
under 10 MB; float32 for local caches). The subset features are float16.

The built-in teacher's data set (Fashion-MNIST train, 60k, zero-padded to 32x32) ships as a package asset under
assets/fid_reference/fashion-mnist-train (made on a GPU: `pqcad-export refstats --images fashion-mnist --out DIR
--device cuda`, or `python -m pqcad_export.metrics.refstats_cli ...` where click/rich are missing). A user's data
set (`--ref-images`) is computed once and cached by content hash (cached_refstats).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..atomic import atomic_write, atomic_write_json
from ..errors import PqcadError
from ..progress import ProgressArg
from .fid import feature_stats, fid_features_vs_stats
from .inception import FeatureExtractor, ImagesLike, as_uint8_nchw, extract_features, file_digest

FORMAT = "pqcad-refstats/1"
NPZ, SIDECAR = "refstats.npz", "refstats.json"
SUBSET, SUBSET_SEED = 1000, 0
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "assets" / "fid_reference" / "fashion-mnist-train"
PathLike = Union[str, Path]


@dataclass
class RefStats:
    mu: np.ndarray                     # [D] float64
    sigma: np.ndarray                  # [D, D] float64
    count: int                         # images behind mu/sigma
    features: Optional[np.ndarray]     # [K, D] float64 subset for KID (None: moments only)
    indices: Optional[np.ndarray]      # [K] rows of the image set the subset came from
    extractor_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma


def subset_indices(n: int, k: int = SUBSET, seed: int = SUBSET_SEED) -> np.ndarray:
    """Sorted rows of a seeded sample without replacement (all rows when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def images_sha256(images: ImagesLike) -> str:
    arr = np.ascontiguousarray(as_uint8_nchw(images, "reference images").numpy())
    h = hashlib.sha256(f"{arr.shape}|{arr.dtype}|".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def compute_refstats(images: ImagesLike, extractor: FeatureExtractor, subset: int = SUBSET,
                     seed: int = SUBSET_SEED, batch_size: Optional[int] = None,
                     progress: ProgressArg = False) -> RefStats:
    """Features of every image -> mu, sigma, and the seeded subset of `subset` feature rows."""
    ext_id = getattr(extractor, "id", None)
    if not isinstance(ext_id, str) or not ext_id:
        raise PqcadError("feature extractor needs a non-empty string `id`")
    imgs = as_uint8_nchw(images, "reference images")
    if imgs.shape[0] < 2:
        raise PqcadError(f"reference statistics need at least 2 images, got {imgs.shape[0]}")
    bs = batch_size or getattr(extractor, "default_batch_size", 64)
    feats = extract_features(extractor, imgs, bs, progress, desc="reference features")
    mu, sigma = feature_stats(feats)
    idx = subset_indices(feats.shape[0], subset, seed) if subset > 0 else None
    meta = {"images": int(imgs.shape[0]), "image_shape": list(imgs.shape[1:]), "images_sha256": images_sha256(imgs),
            "subset": 0 if idx is None else int(len(idx)), "subset_seed": int(seed)}
    return RefStats(mu, sigma, int(feats.shape[0]), None if idx is None else feats[idx], idx, ext_id, meta)


def _sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def _pack_sigma(sigma: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    d = sigma.shape[0]
    upper = sigma[np.triu_indices(d, 1)].astype(dtype)
    if not np.isfinite(upper).all():
        raise PqcadError(f"covariance does not fit in {dtype} (overflow); store it as float32")
    return np.diagonal(sigma).astype(np.float64), upper


def _unpack_sigma(diag: np.ndarray, upper: np.ndarray) -> np.ndarray:
    d = diag.shape[0]
    if upper.shape != (d * (d - 1) // 2,):
        raise PqcadError(f"sigma upper triangle has {upper.shape} entries, expected {d * (d - 1) // 2}")
    s = np.zeros((d, d), np.float64)
    s[np.triu_indices(d, 1)] = upper
    s = s + s.T
    s[np.diag_indices(d)] = diag
    return s


def storage_fid_error(rs: RefStats, sigma_dtype: str) -> Optional[float]:
    """|FID(subset, stored) - FID(subset, exact)|: what the reduced-precision sigma costs, measured on the
    subset features as the 'samples' (None without a subset of >= 2 rows)."""
    if rs.features is None or rs.features.shape[0] < 2:
        return None
    stored = _unpack_sigma(*_pack_sigma(rs.sigma, sigma_dtype))
    return abs(fid_features_vs_stats(rs.features, rs.mu, stored) - fid_features_vs_stats(rs.features, *rs.stats))


def save_refstats(rs: RefStats, out_dir: PathLike, command: str, sigma_dtype: str = "float16",
                  measure_error: bool = True) -> Path:
    """Write refstats.npz and its sidecar (written last, so a folder with a sidecar is complete)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PqcadError(f"--out {out} is a file; give a directory")
    diag, upper = _pack_sigma(rs.sigma, sigma_dtype)
    arrays = {"mu": rs.mu.astype(np.float64), "sigma_diag": diag, "sigma_upper": upper,
              "count": np.int64(rs.count)}
    if rs.features is not None:
        arrays["features"] = rs.features.astype(np.float16)
        arrays["indices"] = np.asarray(rs.indices, np.int64)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / NPZ, write)
    except OSError as exc:
        raise PqcadError(f"cannot write reference statistics to {out}: {exc.strerror or exc}") from None
    err = storage_fid_error(rs, sigma_dtype) if measure_error else None
    side = {"format": FORMAT, "command": command, "count": rs.count, "extractor_id": rs.extractor_id,
            "feature_dim": int(rs.mu.shape[0]), "sigma_storage": f"diag float64 + upper triangle {sigma_dtype}",
            "features_storage": "float16", "sha256": _sha256_file(out / NPZ),
            "bytes": (out / NPZ).stat().st_size, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "storage_fid_error": None if err is None else float(f"{err:.3g}"), **rs.meta}
    atomic_write_json(out / SIDECAR, side)
    return out


def load_refstats(path: PathLike) -> RefStats:
    """A refstats folder (or its sidecar / npz) -> RefStats; a checksum or format mismatch is a PqcadError."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    side_p, npz_p = folder / SIDECAR, folder / NPZ
    if not side_p.is_file() or not npz_p.is_file():
        raise PqcadError(f"no reference statistics at {folder} ({SIDECAR} + {NPZ})")
    try:
        side = json.loads(side_p.read_text())
    except (OSError, ValueError) as exc:
        raise PqcadError(f"unreadable {side_p}: {exc}") from None
    if side.get("format") != FORMAT:
        raise PqcadError(f"{side_p}: unknown format {side.get('format')!r} (expected {FORMAT})")
    digest = _sha256_file(npz_p)
    if digest != side.get("sha256"):
        raise PqcadError(f"{npz_p} fails its checksum (sha256 {digest[:12]}..., sidecar says "
                         f"{str(side.get('sha256'))[:12]}...): corrupt or replaced file")
    try:
        with np.load(npz_p, allow_pickle=False) as z:
            mu = z["mu"].astype(np.float64)
            sigma = _unpack_sigma(z["sigma_diag"].astype(np.float64), z["sigma_upper"].astype(np.float64))
            feats = z["features"].astype(np.float64) if "features" in z else None
            idx = z["indices"] if "indices" in z else None
            count = int(z["count"])
    except PqcadError:
        raise
    except Exception as exc:
        raise PqcadError(f"unreadable {npz_p}: {type(exc).__name__}: {exc}") from None
    if mu.shape != (sigma.shape[0],) or (feats is not None and feats.shape[1:] != mu.shape):
        raise PqcadError(f"{npz_p}: inconsistent shapes mu {mu.shape}, sigma {sigma.shape}")
    return RefStats(mu, sigma, count, feats, idx, str(side.get("extractor_id")), side, folder)


def cached_refstats(images: ImagesLike, extractor: FeatureExtractor, cache_dir: Optional[PathLike] = None,
                    batch_size: Optional[int] = None, progress: ProgressArg = False) -> RefStats:
    """compute_refstats once per (image content, extractor): cached under <fid cache>/refstats-<key>/."""
    from .reference import content_key, default_cache_dir

    key = content_key(images, extractor.id)
    folder = default_cache_dir(cache_dir) / f"refstats-{key[:32]}"
    if (folder / SIDECAR).is_file():
        try:
            hit = load_refstats(folder)
            if hit.meta.get("content_key") == key:
                return hit
        except PqcadError as exc:
            print(f"warning: recomputing reference statistics: {exc}", file=sys.stderr)
    rs = compute_refstats(images, extractor, batch_size=batch_size, progress=progress)
    rs.meta["content_key"] = key
    try:
        save_refstats(rs, folder, command="cached_refstats (--ref-images)", sigma_dtype="float32",
                      measure_error=False)
        rs.path = folder
    except PqcadError as exc:
        print(f"warning: could not cache reference statistics: {exc}", file=sys.stderr)
    return rs


def read_ref_images(source: str, size: int, channels: int) -> np.ndarray:
    """Reference images as uint8 NCHW: 'fashion-mnist' (padded to `size`), an image folder (resized to `size`),
    an idx file, or an .npy / .npz array (uint8 [N,H,W], [N,C,H,W] or [N,H,W,C]; float in [0, 1] is scaled)."""
    from ..data import load_images

    if source == "fashion-mnist":
        return load_images(None, size=size, channels=channels)
    p = Path(source).expanduser()
    if not p.exists():
        raise PqcadError(f"reference images not found: {p}")
    if p.is_file() and p.suffix in (".npy", ".npz"):
        try:
            z = np.load(p, allow_pickle=False)
            arr = z if isinstance(z, np.ndarray) else (z["images"] if "images" in z.files else z[z.files[0]])
        except Exception as exc:
            raise PqcadError(f"cannot read {p} as a numpy array: {type(exc).__name__}: {exc}") from None
        return _as_nchw(np.asarray(arr), p)
    return load_images(p, size=size, channels=channels)


def _as_nchw(arr: np.ndarray, p: Path) -> np.ndarray:
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) or arr.size == 0 or arr.min() < 0 or arr.max() > 1:
            raise PqcadError(f"{p}: images must be uint8 [0, 255] or float [0, 1], got {arr.dtype}")
        arr = np.round(arr * 255).astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] not in (1, 3) and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise PqcadError(f"{p}: expected images [N,H,W], [N,C,H,W] or [N,H,W,C], got shape {arr.shape}")
    return np.ascontiguousarray(arr)

