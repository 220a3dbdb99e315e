#!/usr/bin/env python
"""Per-UNet-call latency on this machine: ORT INT8 (our QDQ export, CPU INT8 copy) vs ORT FP32 vs PyTorch FP32,
plus ONNX Runtime's own `quantize_static` on the same FP model as the baseline to beat.

Usage:
  python tools/bench_latency.py [--model DIR] [--quantized DIR] [--bits w8a8] [--batch 1 8 32] [--threads 2]
                                [--iters 20] [--out bench.json]

Without --quantized, the FP model is quantized round-to-nearest (max-abs per-channel weights, percentile
activation steps from N(0,1) inputs at several timesteps): latency does not depend on the learned values, and
the accuracy column then says how far each INT8 engine is from FP32 for that simple quantization.
Median of >= --iters timed calls after warm-up; the same inputs for every backend.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.base import summarize_ms  # noqa: E402
from engines.onnxruntime import OrtConfig, build_ort_engine, kernel_summary, make_session  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


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
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--levels", nargs="+", default=["extended", "all"], help="ORT graph optimization levels")
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from pqcad_export.export.onnx import export_unet
    from pqcad_export.model_io import load_model

    con = Console()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pqcad_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    fp = load_model(args.model)
    fp_unet = fp.unet.eval()
    c, s, _ = fp.sample_shape
    n_params = sum(p.numel() for p in fp_unet.parameters())
    if args.quantized:
        from pqcad_export.quantize.saved import load_quantized

        q = load_quantized(args.quantized)
    else:
        import copy

        with con.status("quick RTN quantization (latency only)..."):
            q = quick_quantize(copy.deepcopy(fp_unet), args.bits)
    with con.status("exporting ONNX..."):
        export_fp(fp_unet, work / "fp32.onnx")
        export_unet(q.unet, work / "qdq.onnx")
    g = torch.Generator().manual_seed(0)
    calib = [{"sample": torch.randn(8, c, s, s, generator=g).numpy(),
              "timestep": np.linspace(0, 999, 8).round().astype(np.float32)} for _ in range(2)]
    with con.status("ORT quantize_static baseline..."):
        ort_quantize_static(work / "fp32.onnx", work / "ort_static_u8.onnx", calib, u8=True)
        ort_quantize_static(work / "fp32.onnx", work / "ort_static_s8.onnx", calib, u8=False)
    engines = {}
    with con.status("building our ORT engines..."):
        for lvl in args.levels:
            for mode in ("int8", "qdq"):
                d = work / f"ours_{mode}_{lvl}"
                build_ort_engine(work / "qdq.onnx", d, OrtConfig(mode=mode, optimization_level=lvl,
                                                                 intra_op_threads=args.threads))
                engines[f"ours_{mode}_{lvl}"] = d / "model.onnx"

    results = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
               "threads": args.threads, "model": str(fp.path), "params": n_params, "bits": q.bits.name,
               "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
               "quantized_source": args.quantized or "rtn (latency only)", "rows": []}
    for b in args.batch:
        x = torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(b))
        t = torch.linspace(1, 999, b).round().long()
        feeds = {"sample": x.numpy(), "timestep": t.float().numpy()}
        with torch.no_grad():
            ref = fp_unet(x, t).sample.numpy()
            qref = q(x, t).numpy()
        row = {"batch": b}
        calls = {}

        def _pt():
            with torch.no_grad():
                return fp_unet(x, t)

        calls["pytorch_fp32"] = (_pt, ref)
        cands = {f"ort_fp32_{lvl}": (work / "fp32.onnx", lvl) for lvl in args.levels}
        cands.update({f"ort_static_{k}_{lvl}": (work / f"ort_static_{k}.onnx", lvl) for k in ("u8", "s8")
                      for lvl in args.levels})
        cands.update({k: (p, k.rsplit("_", 1)[1]) for k, p in engines.items()})
        outs = {}
        for name, (path, lvl) in cands.items():
            sess = make_session(path, OrtConfig(optimization_level=lvl, intra_op_threads=args.threads,
                                                provider="cpu"))
            outs[name] = sess.run(None, feeds)[0]
            calls[name] = (lambda sess=sess: sess.run(None, feeds), None)
        # round-robin timing: every backend sees the same machine load (this host is shared)
        samples = {k: [] for k in calls}
        for _ in range(args.warmup):
            for fn, _r in calls.values():
                fn()
        for _ in range(args.iters):
            for k, (fn, _r) in calls.items():
                t0 = time.perf_counter()
                fn()
                samples[k].append((time.perf_counter() - t0) * 1e3)
        for k, v in samples.items():
            st = summarize_ms(v, b, args.warmup, "perf_counter/round-robin")
            r = {"median_ms": st.median_ms, "p90_ms": st.p90_ms, "min_ms": st.min_ms}
            if k == "pytorch_fp32":
                r["rel_l2_vs_fp32"] = 0.0
            else:
                r["rel_l2_vs_fp32"] = rel(outs[k], ref)
                r["rel_l2_vs_quant_torch"] = rel(outs[k], qref) if k.startswith("ours") else None
            row[k] = r
        results["rows"].append(row)
        results["load_average"] = os.getloadavg()
        base = row["pytorch_fp32"]["median_ms"]
        tab = Table(title=f"batch {b}: per-UNet-call latency ({args.threads} threads)")
        for col in ("backend", "median ms", "ms/sample", "speedup vs PyTorch FP32", "rel L2 vs FP32 eps"):
            tab.add_column(col)
        for name, r in row.items():
            if name == "batch":
                continue
            r["speedup_vs_pytorch_fp32"] = base / r["median_ms"]
            tab.add_row(name, f"{r['median_ms']:.2f}", f"{r['median_ms'] / b:.3f}",
                        f"{r['speedup_vs_pytorch_fp32']:.2f}x", f"{r['rel_l2_vs_fp32']:.3g}")
        con.print(tab)
    results["kernels"] = {k: kernel_summary(p, OrtConfig(optimization_level="extended"))["int8_kernels"]
                          for k, p in {**engines, "ort_static_u8": work / "ort_static_u8.onnx"}.items()}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        con.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
