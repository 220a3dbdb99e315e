"""Make a reference-statistics folder (refstats.npz + refstats.json) from a data set: the body of
`pqcad-export refstats` and of `python -m pqcad_export.metrics.refstats_cli` (argparse: machines without click).

The shipped asset was made on a GPU with full-FP32 convolutions (no TF32), so its extractor id equals the CPU one:

    python -m pqcad_export.metrics.refstats_cli --images fashion-mnist --device cuda \\
        --out pqcad_export/assets/fid_reference/fashion-mnist-train
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import PqcadError
from .refstats import SUBSET, load_refstats

SIZE, CHANNELS = 32, 1  # the built-in teacher's sample shape (Fashion-MNIST zero-padded 28 -> 32)


def make_refstats(images: str, out: str, device: str = "cpu", limit: Optional[int] = None,
                  weights: Optional[str] = None, batch_size: Optional[int] = None, subset: int = SUBSET,
                  sigma_dtype: str = "float16", size: int = SIZE, channels: int = CHANNELS,
                  quiet: bool = False) -> dict:
    """Compute and write the statistics; returns the sidecar (with `seconds`). Validates everything first."""
    import torch

    from .inception import InceptionFeatures
    from .refstats import compute_refstats, read_ref_images, save_refstats

    if limit is not None and limit < 2:
        raise PqcadError(f"--limit must be >= 2, got {limit}")
    if subset < 0:
        raise PqcadError(f"--subset must be >= 0, got {subset}")
    if sigma_dtype not in ("float16", "float32"):
        raise PqcadError(f"--sigma-dtype must be float16 or float32, got {sigma_dtype}")
    out_p = Path(out)
    if out_p.exists() and not out_p.is_dir():
        raise PqcadError(f"--out {out_p} is a file; give a directory")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PqcadError("--device cuda requested but CUDA is not available")
    ext = InceptionFeatures(weights, device=dev, tf32=False)  # no TF32: the same features (and id) as on a CPU
    imgs = read_ref_images(images, size, channels)
    if limit is not None:
        imgs = imgs[:limit]
    parts = ["pqcad-export", "refstats", "--images", images, "--out", out, "--device", device]
    for flag, v, default in (("--limit", limit, None), ("--subset", subset, SUBSET),
                             ("--sigma-dtype", sigma_dtype, "float16")):
        if v != default:
            parts += [flag, str(v)]
    t0 = time.perf_counter()
    rs = compute_refstats(imgs, ext, subset=subset, batch_size=batch_size, progress=not quiet)
    rs.meta["source"] = images
    save_refstats(rs, out_p, command=shlex.join(parts), sigma_dtype=sigma_dtype)
    side = dict(load_refstats(out_p).meta)  # read back: proves the checksum and shapes
    side["seconds"] = round(time.perf_counter() - t0, 1)
    return side


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Inception reference statistics (FID mu/sigma + KID feature subset)")
    p.add_argument("--images", required=True, help="fashion-mnist | image folder | .npy/.npz array | idx file")
    p.add_argument("--out", required=True, help="output folder (refstats.npz + refstats.json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (tests, CPU smoke runs)")
    p.add_argument("--weights", default=None, help="TF-Inception default_1.pt (else $PQCAD_FID_WEIGHTS / package)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--subset", type=int, default=SUBSET, help="feature rows kept for KID")
    p.add_argument("--sigma-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        side = make_refstats(a.images, a.out, a.device, a.limit, a.weights, a.batch_size, a.subset,
                             a.sigma_dtype, quiet=a.quiet)
    except PqcadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{a.out}: {side['count']} images, {side['bytes'] / 1e6:.2f} MB, storage FID error "
          f"{side['storage_fid_error']}, {side['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
