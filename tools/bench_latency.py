#!/usr/bin/env python
"""Per-UNet-call latency on this machine, each engine in its own process (engines.bench): our QDQ export on
OpenVINO and as the ONNX Runtime INT8 engine, against the FP model on ONNX Runtime FP32 and OpenVINO at its
default precision (bf16 on AVX-512 BF16), optionally ONNX Runtime's own `quantize_static` baseline.

Usage:
  python tools/bench_latency.py [--model DIR] [--quantized DIR] [--bits w8a8] [--batch 1 8 32] [--threads 2]
                                [--iters 50] [--reps 3] [--ort-static] [--out bench.json]

Without --quantized, the FP model is quantized round-to-nearest (max-abs per-channel weights, percentile
activation steps from N(0,1) inputs at several timesteps): latency does not depend on the learned values, and
the accuracy column then says how far each INT8 engine is from FP32 for that simple quantization.
Engines take turns (engines.bench): medians over --reps x --rounds turns, ratios per round; the same inputs
for every engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def quick_quantize(unet, bits: str, seed: int = 0):
    """Round-to-nearest W/A quantization of an FP UNet (latency benchmarking only)."""
    from pqcad_export.bits import parse_bits
    from pqcad_export.quantize.blocks import call_unet
    from pqcad_export.quantize.model import QuantizedModel
    from pqcad_export.quantize.wrap import attn_processors, freeze_all, quant_layers, wrap_unet

    spec = parse_bits(bits)
    wrap_unet(unet, spec, attn_matmul_quant=True)
    for _, m in quant_layers(unet):
        w = m.w_fp
        m.wq.delta = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-8) / m.wq.qmax
    qs = [q for _, m in list(quant_layers(unet)) + list(attn_processors(unet)) for q in m.act_quantizers()]
    for q in qs:
        q.calibrating = True
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    with torch.no_grad():
        call_unet(unet, {"sample": torch.randn(8, c, s, s, generator=g),
                         "timestep": torch.linspace(0, 999, 8).round().long()})
    for q in qs:
        q.init_from_data(method="percentile")
    freeze_all(unet)
    return QuantizedModel(unet=unet, bits=spec, method="rtn", meta={})


def export_fp(unet, path: Path) -> None:
    from pqcad_export.export.onnx import _UNetIO

    c, s = unet.config.in_channels, unet.config.sample_size
    kw = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    with torch.no_grad():
        torch.onnx.export(_UNetIO(unet, False).eval(), (torch.randn(2, c, s, s), torch.tensor([1.0, 500.0])),
                          str(path), input_names=["sample", "timestep"], output_names=["eps"],
                          dynamic_axes={"sample": {0: "b"}, "timestep": {0: "b"}, "eps": {0: "b"}},
                          opset_version=17, do_constant_folding=True, **kw)


def ort_quantize_static(fp_onnx: Path, out: Path, calib: list[dict], per_channel=True, u8=True) -> None:
    """ONNX Runtime's own static quantization of the FP graph (QDQ, calibrated on the same inputs)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp_onnx), str(pre), skip_symbolic_shape=True)
        src = pre
    except Exception:
        src = fp_onnx
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8 if u8 else QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="FP diffusers UNet dir (default: built-in teacher)")
    ap.add_argument("--quantized", default=None, help="saved quantized model dir (default: quick RTN)")
    ap.add_argument("--bits", default="w8a8")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="repetitions, each with fresh processes")
    ap.add_argument("--rounds", type=int, default=5, help="turns per process and repetition (engines take turns)")
    ap.add_argument("--ort-static", action="store_true", help="also ONNX Runtime's quantize_static (u8) baseline")
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from engines.bench import ratio, run_bench
    from pqcad_export.export.onnx import export_unet
    from pqcad_export.model_io import load_model
    from pqcad_export.pipeline.references import bench_targets, fastest_fp_row

    work = Path(args.workdir or tempfile.mkdtemp(prefix="pqcad_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    fp = load_model(args.model)
    c, s, _ = fp.sample_shape
    if args.quantized:
        from pqcad_export.quantize.saved import load_quantized

        q = load_quantized(args.quantized)
    else:
        import copy

        q = quick_quantize(copy.deepcopy(fp.unet.eval()), args.bits)
    export_unet(q.unet, work / "qdq.onnx")
    targets = bench_targets(work / "qdq.onnx", args.model, work)
    if args.ort_static:
        from engines.bench import BenchTarget

        g = torch.Generator().manual_seed(0)
        calib = [{"sample": torch.randn(8, c, s, s, generator=g).numpy(),
                  "timestep": np.linspace(0, 999, 8).round().astype(np.float32)} for _ in range(2)]
        ort_quantize_static(work / "fp32.onnx", work / "ort_static_u8.onnx", calib, u8=True)
        targets.append(BenchTarget("ort-static-u8", "onnxruntime", str(work / "ort_static_u8.onnx"), "u8", "all"))
    res = run_bench(targets, args.batch, reps=args.reps, threads=args.threads, warmup=args.warmup, iters=args.iters,
                    rounds=args.rounds, progress=lambda m: print(m, file=sys.stderr))
    res.update({"model": str(fp.path), "bits": q.bits.name, "quantized_source": args.quantized or "rtn (latency only)",
                "torch": torch.__version__})
    for b in args.batch:
        rows = [r for r in res["rows"] if r["batch"] == b]
        best = fastest_fp_row(res, b)
        print(f"batch {b} ({res['cpu_isa']}, {res['threads']} threads): ms per UNet call, median of "
              f"{args.reps} x {res['rounds']} turns")
        for r in rows:
            vs = f"{ratio(res, best['name'], r['name'], b):.2f}x vs fastest FP" if best else ""
            print(f"  {r['name']:22s} {r['precision']:8s} {r['median_ms']:9.2f}  spread {100 * r['spread']:3.0f}%  {vs}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
