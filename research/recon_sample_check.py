"""Does a reconstruction setting keep the teacher's samples? Quantize the built-in teacher with a preset plus
overrides, then compare a few DDIM samples with the FP32 ones from the same noise (relative MSE) and save both rows
as a PNG. A quick CPU sanity check for budgets and learning rates (docs/RESULTS.md, the learning-rate table).

    python -m research.recon_sample_check --calib runs/w4a8/calib --preset paper --set iters=60 act_iters=15 \\
        max_calib=128 fisher=False w_lr=0.05 a_lr=0.001
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time


import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", required=True, help="calibration dir with c_qc/ (pqcad-export calibrate)")
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--method", default="direct", choices=["direct", "pq", "bitshrink"])
    ap.add_argument("--preset", default="paper", choices=["quick", "paper"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="ReconConfig overrides")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--png", default="recon_sample_check.png")
    a = ap.parse_args()

    from calibration.storage import open_set
    from pqcad_export.metrics import save_grid
    from pqcad_export.model_io import load_model
    from pqcad_export.bits import parse_bits
    from pqcad_export.quantize import ReconConfig
    from pqcad_export.quantize.stage import run_quantize
    from pqcad_export.sampling import SamplerConfig, TorchUNet, ddim_sample, to_uint8

    over = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in a.set)}
    teacher = load_model(None, "cpu")
    open_set(a.calib, "c_qc", expect_fingerprint=teacher.fingerprint)  # a set of another model: refused first
    cfg = ReconConfig.preset(a.preset, **{"progress": False, **over})
    t0 = time.time()
    with tempfile.TemporaryDirectory() as qdir:  # the quantize stage, as `pqcad-export quantize` runs it
        q = run_quantize(teacher, a.calib, parse_bits(a.bits), a.method, cfg, qdir, "cpu", seed=0,
                         keep_checkpoints=False)
    sc = SamplerConfig(steps=a.steps, batch_size=a.samples, seed=0)
    fp = ddim_sample(TorchUNet(teacher.unet), teacher.scheduler_config, teacher.sample_shape, a.samples, sc)
    qs = ddim_sample(q, teacher.scheduler_config, teacher.sample_shape, a.samples, sc)
    rel = float(((fp - qs) ** 2).mean() / (fp ** 2).mean())
    save_grid(torch.cat([to_uint8(fp), to_uint8(qs)]).numpy(), a.png, nrow=a.samples)
    print(json.dumps({"preset": a.preset, "overrides": {k: str(v) for k, v in over.items()}, "bits": a.bits,
                      "method": a.method, "geomean_pert": q.log["geomean_pert"], "sample_rel_mse": round(rel, 4),
                      "seconds": round(time.time() - t0, 1), "png": a.png}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
