"""Where does a quantized model's sample error come from: its integer weights or its 8-bit activations, and how
does it grow with the number of sampling steps? Samples the FP model and each quantized model from the same noise,
once as quantized and once with activation quantization off (weights stay on their integer grid), at 100 and 50
DDIM steps, and reports the paired pixel MSE ([0, 1] units) to the FP model's samples at the same step count.

Why: on the built-in teacher even W8A8 lands 25-27 FID above FP32 (docs/RESULTS.md, run 3), far from the paper.

    python -m research.quant_error_split W/jobs/quant-w8a8-pq W/jobs/quant-w4a8-pq --n 64 \
        --out docs/results/quant_error_split.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


from pqcad_export.atomic import atomic_write_json


def main(argv=None) -> int:
    from pqcad_export.model_io import load_model
    from pqcad_export.quantize import load_quantized
    from pqcad_export.quantize.wrap import set_act_quant
    from pqcad_export.sampling import SamplerConfig, TorchUNet, ddim_sample

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("quantized", nargs="+", help="quantized model directories (made from the built-in teacher)")
    ap.add_argument("--n", type=int, default=64, help="samples per model and step count")
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 50])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    fp = load_model(None)

    def sample(unet, steps):
        with torch.no_grad():
            x = ddim_sample(TorchUNet(unet.eval()), fp.scheduler_config, fp.sample_shape, a.n,
                            SamplerConfig(steps=steps, eta=0.0, batch_size=a.n, seed=a.seed), device="cpu")
        return (x.clamp(-1, 1) + 1) / 2

    res = {"n": a.n, "seed": a.seed, "rows": []}
    for steps in a.steps:
        ref = sample(fp.unet, steps)
        for path in a.quantized:
            q = load_quantized(path, "cpu")
            full = float((sample(q.unet, steps) - ref).pow(2).mean())
            set_act_quant(q.unet, False)
            w_only = float((sample(q.unet, steps) - ref).pow(2).mean())
            row = {"model": Path(path).name, "bits": q.bits.name, "steps": steps, "mse_quantized": full,
                   "mse_weights_only": w_only}
            res["rows"].append(row)
            print(f"{row['model']:24s} {steps:3d} steps: paired MSE to FP32 {full:.4f} quantized, "
                  f"{w_only:.4f} with fp32 activations", flush=True)
    if a.out:
        atomic_write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
