#!/usr/bin/env python
"""The efficiency table of issue 9 (the paper's Table II on our teacher): per precision (FP32, W8A8, W4A8) and
backend, the model size, GBOPs per UNet call, unet_ms_per_call, ms_per_image and throughput.

- Model size: weights at their bit width plus FP32 per-channel scales and the parameters kept in FP32 (what an
  integer engine must store), and the bytes of the engine file actually built.
- GBOPs (bit operations, as in the quantization literature): sum over layers of MACs x weight bits x input
  activation bits, MACs counted with forward hooks on one batch-1 call (convolutions, linear layers and the two
  attention matmuls QK^T and PV at activation x activation bits); FP32 counts 32 x 32.
- Latency: executed engines only (ONNX Runtime and OpenVINO on this machine's CPU: the FP graph, and our QDQ
  export as the ORT INT8 engine and compiled as it is by OpenVINO). ms_per_image = steps x ms_per_call(batch B) / B
  with 100 steps for FP32 and the quantized teacher and 50 for the distilled student (the latency of one call
  does not depend on the learned values, so the quantized rows use a round-to-nearest model); each engine timed
  in its own process, the processes taking turns (engines.bench), ORT engines at the faster of the "extended" and
  "all" optimization levels (the JSON keeps both). TensorRT-RTX rows are built
  (parsed and compiled for --trt-arch) but not run: "validated", no latency.

    python tools/efficiency_table.py --batch 1 32 --out docs/results/efficiency_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import export_fp, quick_quantize  # noqa: E402
from pqcad_export.atomic import atomic_write_json  # noqa: E402


def layer_macs(unet: torch.nn.Module, sample_shape) -> dict[str, int]:
    """MACs of one batch-1 UNet call per module name: Conv2d/Linear from their outputs, attention from its
    sequence length (QK^T and PV: 2 x N^2 x inner_dim)."""
    from diffusers.models.attention_processor import Attention

    macs: dict[str, int] = {}
    hooks = []

    def conv_hook(name):
        def f(m, inp, out):
            if isinstance(m, torch.nn.Conv2d):
                k = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            else:
                k = m.in_features
            macs[name] = macs.get(name, 0) + int(out.numel() // out.shape[0]) * k
        return f

    def attn_hook(name):
        def f(m, inp, out):
            h = inp[0]
            n = h.shape[2] * h.shape[3] if h.dim() == 4 else h.shape[1]
            macs[name] = macs.get(name, 0) + 2 * n * n * m.to_q.out_features
        return f

    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_hook(attn_hook(name)))
    c, h, w = sample_shape
    with torch.no_grad():
        unet(torch.randn(1, c, h, w), torch.tensor([500])).sample
    for hk in hooks:
        hk.remove()
    return macs


def bit_widths(q) -> dict[str, tuple[int, int]]:
    """(weight bits, input activation bits) per layer of a quantized model; attention matmuls at act x act."""
    from pqcad_export.quantize.wrap import attn_processors, quant_layers

    out = {}
    for name, m in quant_layers(q.unet):
        out[name] = (int(m.wq.bits), int(m.aq.bits) if m.aq.enabled else 32)
    for name, p in attn_processors(q.unet):
        a = int(p.aq_q.bits) if p.aq_q.enabled else 32
        out[name.rsplit(".processor", 1)[0]] = (a, a)
    return out


def gbops(macs: dict[str, int], bits: dict[str, tuple[int, int]]) -> float:
    return sum(n * bits.get(k, (32, 32))[0] * bits.get(k, (32, 32))[1] for k, n in macs.items()) / 1e9


def weight_bytes(unet: torch.nn.Module, bits: dict[str, tuple[int, int]]) -> int:
    """Integer weights packed at their bit width + one FP32 scale per output channel; everything else FP32."""
    from pqcad_export.bits import packed_bytes

    total = 0
    for name, m in unet.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if pname == "weight" and name in bits and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                total += packed_bytes(p.numel(), bits[name][0]) + 4 * p.shape[0]
            else:
                total += 4 * p.numel()
    return total


ORT_LEVELS = ("extended", "all")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="FP diffusers UNet dir (default: the built-in teacher)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="repetitions, each with fresh processes that take turns (engines.bench)")
    ap.add_argument("--trt-arch", default="SM89", help="TensorRT-RTX build target of the validated rows ('' = skip)")
    ap.add_argument("--relax", type=float, nargs="*", default=[0.05, 0.1, 0.2], metavar="FRAC",
                    help="PCR relaxing: also time W4A8 with fp32 activations and give the 50-step sampler's "
                         "ms_per_image with this fraction of steps on it (none: skip)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--table", default=None, metavar="JSON", help="only print the markdown table of a results JSON")
    a = ap.parse_args(argv)
    if a.table:
        print(markdown(json.loads(Path(a.table).read_text())))
        return 0

    from engines.onnxruntime import OrtConfig, build_ort_engine
    from pqcad_export.export.onnx import export_unet
    from pqcad_export.model_io import load_model
    from pqcad_export.pipeline.compare import device_description

    torch.set_num_threads(a.threads)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="pqcad_eff_"))
    work.mkdir(parents=True, exist_ok=True)
    fp = load_model(a.model)
    unet = fp.unet.eval()
    macs = layer_macs(unet, fp.sample_shape)
    export_fp(unet, work / "fp32.onnx")
    rows = [{"precision": "FP32", "backend": "onnxruntime-cpu", "status": "executed", "engine": work / "fp32.onnx",
             "steps": [100], "gbops": gbops(macs, {}), "weight_bytes": weight_bytes(unet, {})}]
    for bits in ("w8a8", "w4a8"):
        q = quick_quantize(copy.deepcopy(unet), bits)
        bw = bit_widths(q)
        export_unet(q.unet, work / f"{bits}.qdq.onnx")
        d = work / f"ort_{bits}"
        build_ort_engine(work / f"{bits}.qdq.onnx", d, OrtConfig(mode="int8", intra_op_threads=a.threads))
        common = {"precision": bits.upper(), "gbops": gbops(macs, bw), "weight_bytes": weight_bytes(unet, bw),
                  "steps": [100, 50]}
        rows.append({**common, "backend": "onnxruntime-cpu (INT8 kernels)", "status": "executed",
                     "engine": d / "model.onnx"})
        if a.trt_arch:
            rows.append({**common, **_trt_validate(work / f"{bits}.qdq.onnx", work / f"trt_{bits}", a.trt_arch)})
        if bits == "w4a8" and a.relax:
            rows.append(_relaxed_row(q, work, macs, unet))
    # OpenVINO compiles the same files as they are: FP at its default inference precision, the QDQ exports INT8
    for r in list(rows):
        if r["status"] == "executed" and r["backend"].startswith("onnxruntime") and "relaxed" not in r["precision"]:
            src = work / "fp32.onnx" if r["precision"] == "FP32" else work / f"{r['precision'].lower()}.qdq.onnx"
            rows.append({**{k: v for k, v in r.items() if k not in ("engine", "backend")},
                         "precision": "FP (OpenVINO default)" if r["precision"] == "FP32" else r["precision"],
                         "backend": "openvino-cpu" + ("" if r["precision"] == "FP32" else " (INT8 kernels)"),
                         "engine": src, "bench_backend": "openvino"})
    # every engine in its own process per batch, taking turns (engines.bench); ORT engines at both
    # optimization levels, each row keeping its faster one ('all' adds NCHWc layouts: ~1.4x on FP32 convolutions)
    from engines.bench import BenchTarget, row, run_bench

    targets = []
    for i, r in enumerate(rows):
        eng = r.pop("engine", None)
        be = r.pop("bench_backend", "onnxruntime")
        r["engine_bytes"] = _engine_bytes(eng) if eng else r.get("engine_bytes")
        if r["status"] == "executed":
            levels = ("default",) if be == "openvino" else ORT_LEVELS
            targets += [BenchTarget(f"{i}|{lvl}", be, str(eng), level=lvl if be != "openvino" else "all")
                        for lvl in levels]
            r["latency"] = {}
    bench = run_bench(targets, a.batch, reps=a.reps, threads=a.threads, warmup=a.warmup, iters=a.iters)
    for b in a.batch:
        for i, r in enumerate(rows):
            if r["status"] != "executed":
                continue
            by_level = {t.name.split("|")[1]: row(bench, t.name, b) for t in targets if t.name.split("|")[0] == str(i)}
            lvl = min(by_level, key=lambda k: by_level[k]["median_ms"])
            ms = by_level[lvl]["median_ms"]
            r["runtime_precision"] = by_level[lvl]["precision"]
            r["latency"][str(b)] = {"unet_ms_per_call": round(ms, 3), "level": lvl,
                                    "spread": by_level[lvl]["spread"],
                                    "ms_per_call_by_level": {k: v["median_ms"] for k, v in by_level.items()},
                                    **{f"ms_per_image_{s}steps": round(s * ms / b, 2) for s in r["steps"]},
                                    **{f"images_per_s_{s}steps": round(1e3 * b / (s * ms), 3) for s in r["steps"]}}
    if a.relax:
        res_relax = _relax_latency(rows, a.relax, fp.scheduler_config)
    res = {"machine": f"{device_description(torch.device('cpu'))}, {a.threads} threads",
           "model": str(fp.path), "params": sum(p.numel() for p in unet.parameters()),
           "macs_per_call": sum(macs.values()), "onnxruntime": __import__("onnxruntime").__version__,
           "torch": torch.__version__, "rows": rows, **({"relax": res_relax} if a.relax else {}),
           "bench": {k: v for k, v in bench.items() if k != "rows"}}
    if a.out:
        atomic_write_json(a.out, res, indent=1, sort_keys=False)
    print(markdown(res))
    return 0


def _relaxed_row(q, work: Path, macs, unet) -> dict:
    """The relaxed engine of `build --relax-frac` (pipeline/relax.py): the W4A8 export without activation QDQ."""
    from pqcad_export.pipeline.relax import relaxed_engine
    from pqcad_export.quantize.wrap import set_act_quant

    d = work / "ort_w4a8_relaxed"
    relaxed_engine(q, work / "w4a8_relaxed.onnx", d, "onnxruntime")
    r = copy.deepcopy(q)
    set_act_quant(r.unet, False)
    bw = bit_widths(r)
    return {"precision": "W4A8, fp32 activations (relaxed engine)", "backend": "onnxruntime-cpu", "status": "executed",
            "engine": d / "model.onnx", "steps": [50], "gbops": gbops(macs, bw), "weight_bytes": weight_bytes(unet, bw)}


def _relax_latency(rows: list[dict], fracs: list[float], scheduler_config: dict) -> list[dict]:
    """ms_per_image of the 50-step two-engine sampler: relaxed steps x the relaxed engine's per-call median +
    the other steps x the INT8 engine's (both measured above, round-robin; the sampler's own overhead excluded)."""
    from engines.relax import average_act_bits, relaxed_timesteps
    from pqcad_export.pipeline.relax import RELAXED_ACT_BITS
    from pqcad_export.sampling import ddim_timesteps

    main = next(r for r in rows if r["precision"] == "W4A8" and r["status"] == "executed")
    relaxed = next(r for r in rows if r["precision"].startswith("W4A8, fp32"))
    grid = [int(t) for t in ddim_timesteps(scheduler_config, 50)]
    out = []
    for f in fracs:
        n = len(relaxed_timesteps(grid, f, "x0"))
        lat = {b: round((n * relaxed["latency"][b]["unet_ms_per_call"] + (50 - n) * v["unet_ms_per_call"]) / int(b), 2)
               for b, v in main["latency"].items()}
        out.append({"fraction": f, "where": "x0", "relaxed_steps": n, "steps": 50,
                    "average_act_bits": average_act_bits(50, n, 8, RELAXED_ACT_BITS), "ms_per_image_by_batch": lat})
    return out


def markdown(res: dict) -> str:
    """The table of docs/RESULTS.md: one row per precision x backend x steps, latency at the largest batch."""
    out = ["| precision | backend | status | steps | weights (packed) | engine file | GBOPs / call | "
           "unet_ms_per_call (batch 1) | ms_per_image (batch B) | images/s (batch B) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lat = r.get("latency") or {}
        b1 = lat.get("1", {}).get("unet_ms_per_call")
        big = max(lat, key=int) if lat else None
        for st in (r["steps"] if lat else ["–"]):
            v = lat.get(big, {}) if big else {}
            ms, ips = v.get(f"ms_per_image_{st}steps"), v.get(f"images_per_s_{st}steps")
            out.append(f"| {r['precision']} | {r['backend']} | {r['status']} | {st} | {r['weight_bytes'] / 1e6:.2f} MB | "
                       f"{(r.get('engine_bytes') or 0) / 1e6:.2f} MB | {r['gbops']:.1f} | "
                       f"{'–' if b1 is None else f'{b1:.1f}'} | {'–' if ms is None else f'{ms:.0f} (B={big})'} | "
                       f"{'–' if ips is None else f'{ips:.2f}'} |")
    if res.get("relax"):
        out += ["", "| W4A8 student, 50 steps, relaxed fraction (x_0 end) | relaxed steps | average activation bits | "
                "ms_per_image (batch 1) | ms_per_image (largest batch) |", "|---|---|---|---|---|"]
        for r in res["relax"]:
            lat = r["ms_per_image_by_batch"]
            big = max(lat, key=int)
            out.append(f"| {r['fraction']:g} | {r['relaxed_steps']} | {r['average_act_bits']:.2f} | "
                       f"{lat.get('1', '–')} | {lat[big]} (B={big}) |")
    return "\n".join(out)


def _engine_bytes(path: Path) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.parent.iterdir() if f.is_file() and f.name.startswith(p.stem))


def _trt_validate(onnx_path: Path, out: Path, arch: str) -> dict:
    """Parse + ahead-of-time build with TensorRT-RTX for `arch` (no GPU needed; nothing executed)."""
    from engines.tensorrt import TrtConfig, build_trt_engine

    row = {"backend": f"tensorrt-rtx ({arch.upper()})", "engine": None}
    try:
        info = build_trt_engine(onnx_path, out, TrtConfig(compute_capability=arch.upper()), flavor="tensorrt-rtx")
    except Exception as exc:  # reported in the table, not fatal: the ORT rows stand on their own
        return {**row, "status": f"not built: {type(exc).__name__}: {exc}"[:200]}
    return {**row, "status": "validated", "engine_bytes": info.precision["plan_bytes"],
            "quantized_layers": info.precision["quantized_layers"], "build_seconds": info.precision["build_seconds"]}


if __name__ == "__main__":
    sys.exit(main())
