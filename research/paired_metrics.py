"""Compare the sample sets of research.results evaluations against one reference row without the data: every row
starts from the same initial noise (seed 0), so sample i of a quantized model and sample i of the FP32 model are a
pair. Reports the paired pixel MSE / PSNR over all samples and, when --fid-samples > 0, FID-to-reference on the
first N samples of each row plus the floor of such a small-sample FID (the reference's samples N..2N against its
first N), TF-Inception pool3 features cached per row, so a rerun resumes.

Used when the 10k-sample FIDs could not be finished on the GPU (docs/RESULTS.md says which numbers came from here):

    python -m research.paired_metrics --ref WORK/jobs/eval-fp32-100 WORK/jobs/eval-quant-w4a8-* --fid-samples 1000 \\
        --out docs/results/gpu/paired_w4a8.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


from pqcad_export.atomic import atomic_write_json


def paired_pixel(a: np.ndarray, b: np.ndarray) -> dict:
    """MSE and PSNR on [0, 1] pixels, per sample pair, averaged (uint8 inputs of the same noise)."""
    if a.shape != b.shape:
        raise SystemExit(f"sample sets differ in shape: {a.shape} vs {b.shape}")
    d = (a.astype(np.float32) - b.astype(np.float32)) / 255.0
    mse = (d.reshape(len(d), -1) ** 2).mean(axis=1)
    psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
    return {"pairs": int(len(d)), "mse": round(float(mse.mean()), 6), "psnr_db": round(float(psnr.mean()), 3)}


def _features(row: Path, n: int, ext, cache_dir: Path, start: int = 0) -> np.ndarray:
    cache = cache_dir / (f"{row.name}.pool{n}" + (f"from{start}" if start else "") + ".npy")
    if cache.is_file():
        return np.load(cache)
    imgs = np.load(row / "images.npy", mmap_mode="r")[start:start + n]
    t0 = time.time()
    pool = ext.features(np.array(imgs), batch_size=50)  # a writable copy of the memory-mapped rows
    print(f"{row.name}: {n} features in {time.time() - t0:.0f}s", flush=True)
    np.save(cache, pool.astype(np.float32))
    return pool


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="reference evaluation dir (holds images.npy), e.g. eval-fp32-100")
    ap.add_argument("rows", nargs="+", help="evaluation dirs to compare with it")
    ap.add_argument("--fid-samples", type=int, default=0, help="FID-to-reference on the first N samples (0 = off)")
    ap.add_argument("--weights", default=None, help="TF-Inception default_1.pt (default: the installed one)")
    ap.add_argument("--cache", default=None, help="feature cache dir (default: next to --out)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    ref = Path(a.ref)
    out = Path(a.out)
    ref_imgs = np.load(ref / "images.npy", mmap_mode="r")
    res: dict = {"reference": ref.name, "rows": {}, "fid_samples": a.fid_samples}
    ext = ref_pool = None
    if a.fid_samples:
        import torch

        from pqcad_export.metrics import InceptionFeatures, fid_from_features

        ext = InceptionFeatures(a.weights, device=torch.device("cpu"))
        res["fid_features"] = ext.id
        cache = Path(a.cache) if a.cache else out.parent / "feature_cache"
        cache.mkdir(parents=True, exist_ok=True)
        ref_pool = _features(ref, a.fid_samples, ext, cache)
        # the noise floor of an N-sample FID: the reference's next N samples against its first N
        floor = _features(ref, a.fid_samples, ext, cache, start=a.fid_samples)
        res["fid_floor_ref_vs_ref"] = round(float(fid_from_features(floor, ref_pool)), 3)
    for r in map(Path, a.rows):
        if r.resolve() == ref.resolve():
            continue
        row = {**paired_pixel(np.load(r / "images.npy", mmap_mode="r"), ref_imgs)}
        if (r / "sampled.json").is_file():
            row.update(json.loads((r / "sampled.json").read_text()))
        if ext is not None:
            row["fid_to_ref"] = round(float(fid_from_features(_features(r, a.fid_samples, ext, cache), ref_pool)), 3)
        res["rows"][r.name] = row
        atomic_write_json(out, res, indent=1, sort_keys=False)  # after every row: partial results survive
        print(r.name, row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
