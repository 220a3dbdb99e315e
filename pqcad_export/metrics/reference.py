"""Reference (dataset) FID statistics: computed once, cached by content so 60k-image features are not redone.

Key = sha256(shape, dtype, bytes of the uint8 array) + extractor id. Cache dir: argument, else $PQCAD_CACHE/fid,
else ~/.cache/pqcad-export/fid. Files are .npz (mu, sigma, count, key, extractor_id); never written into the repo.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..atomic import atomic_write
from ..errors import PqcadError
from ..progress import ProgressArg
from .fid import feature_stats
from .inception import FeatureExtractor, ImagesLike, as_uint8_nchw, extract_features

CACHE_ENV = "PQCAD_CACHE"


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    key: str
    path: Optional[Path]
    cached: bool  # True when loaded from the cache instead of computed

    @property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma


def default_cache_dir(cache_dir: Union[str, Path, None] = None) -> Path:
    if cache_dir not in (None, ""):
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "fid"
    return Path.home() / ".cache" / "pqcad-export" / "fid"


def content_key(images: ImagesLike, extractor_id: str) -> str:
    """sha256 of the images' exact bytes (plus shape/dtype) and the extractor id."""
    t = as_uint8_nchw(images, "reference images")
    arr = np.ascontiguousarray(t.numpy())
    h = hashlib.sha256()
    h.update(f"{arr.shape}|{arr.dtype}|{extractor_id}|".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _load(path: Path, key: str) -> Optional[ReferenceStats]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            mu, sigma, count = z["mu"].astype(np.float64), z["sigma"].astype(np.float64), int(z["count"])
    except Exception as exc:  # corrupt / truncated cache file: recompute rather than fail
        print(f"warning: ignoring unreadable FID cache {path}: {type(exc).__name__}", file=sys.stderr)
        return None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        return None
    return ReferenceStats(mu, sigma, count, key, path, cached=True)


def _save_atomic(path: Path, **arrays) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(fh, **arrays)

    atomic_write(path, write)


def reference_stats(images: ImagesLike, extractor: FeatureExtractor, cache_dir: Union[str, Path, None] = None,
                    batch_size: Optional[int] = None, progress: ProgressArg = False,
                    use_cache: bool = True) -> ReferenceStats:
    """(mu, sigma) of `images` under `extractor`, from the cache when this exact content was seen before."""
    ext_id = getattr(extractor, "id", None)
    if not isinstance(ext_id, str) or not ext_id:
        raise PqcadError("feature extractor needs a non-empty string `id` (used in the reference cache key)")
    key = content_key(images, ext_id)
    path = default_cache_dir(cache_dir) / f"ref-{key[:32]}.npz"
    if use_cache and path.is_file():
        hit = _load(path, key)
        if hit is not None:
            return hit
    bs = batch_size or getattr(extractor, "default_batch_size", 64)
    feats = extract_features(extractor, images, bs, progress, desc="reference features")
    mu, sigma = feature_stats(feats)
    if use_cache:
        try:
            _save_atomic(path, mu=mu, sigma=sigma, count=np.int64(feats.shape[0]), key=np.str_(key),
                         extractor_id=np.str_(ext_id))
        except OSError as exc:
            print(f"warning: could not write FID cache {path}: {exc}", file=sys.stderr)
            path = None
    else:
        path = None
    return ReferenceStats(mu, sigma, int(feats.shape[0]), key, path, cached=False)
