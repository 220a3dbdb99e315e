"""PQ vs direct vs bit-shrink at the same iteration budget (issue 4's measurement): per-method geometric-mean
block perturbation, Delta_Pert vs direct, and FID-to-FP32 of the 100-step quantized model (PyTorch fake-quant)
against the FP32 100-step teacher from the same initial noise.

    python -m research.ablation_pq --calib runs/w4a8/calib --bits w4a8 --samples 10000 --preset paper --device cuda
    python -m research.ablation_pq --calib runs/w4a8/calib --samples 100          # CPU smoke scale (quick preset)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


from calibration.storage import open_set
from pqcad_export.bits import parse_bits
from pqcad_export.metrics import InceptionFeatures, fid_from_features
from pqcad_export.model_io import load_model
from pqcad_export.quantize import ReconConfig
from pqcad_export.quantize.stage import run_quantize
from pqcad_export.quantize.progressive import delta_pert
from pqcad_export.sampling import SamplerConfig, TorchUNet, ddim_sample, to_uint8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="FP teacher (default: built-in)")
    ap.add_argument("--calib", required=True, help="calibration dir with c_qc/ (pqcad-export calibrate)")
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--methods", default="direct,pq,bitshrink")
    ap.add_argument("--preset", default="quick", choices=["quick", "paper"])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--weights", default=None, help="TF-Inception default_1.pt")
    ap.add_argument("--out", default="ablation_pq.json")
    args = ap.parse_args()

    dev = torch.device(args.device)
    teacher = load_model(args.model, dev)
    bits = parse_bits(args.bits)
    open_set(args.calib, "c_qc", expect_fingerprint=teacher.fingerprint)  # a set of another model: refused first
    cfg = ReconConfig.preset(args.preset, seed=args.seed, progress=False)
    scfg = SamplerConfig(steps=args.steps, eta=0.0, batch_size=args.batch_size, seed=args.seed)
    ext = InceptionFeatures(args.weights, device=dev)

    def feats(fn):
        imgs = ddim_sample(fn, teacher.scheduler_config, teacher.sample_shape, args.samples, scfg, dev)
        return ext.features(to_uint8(imgs))

    t0 = time.time()
    ref = feats(TorchUNet(teacher.unet))
    res = {"bits": bits.name, "preset": args.preset, "samples": args.samples, "steps": args.steps,
           "seed": args.seed, "device": str(dev), "fid_features": ext.id, "methods": {}}
    logs = {}
    for m in args.methods.split(","):
        t1 = time.time()
        with tempfile.TemporaryDirectory() as qdir:  # the quantize stage, as `pqcad-export quantize` runs it
            q = run_quantize(teacher, args.calib, bits, m, cfg, qdir, dev, seed=args.seed, keep_checkpoints=False)
        logs[m] = q.log
        fid = fid_from_features(feats(q), ref)
        res["methods"][m] = {"geomean_pert": q.log["geomean_pert"], "fid_to_fp32": round(fid, 4),
                             "seconds": round(time.time() - t1, 1)}
        print(m, res["methods"][m], flush=True)
    if "direct" in logs:
        for m in logs:
            if m != "direct":
                res["methods"][m]["delta_pert_vs_direct"] = delta_pert(logs[m], logs["direct"])
    res["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
