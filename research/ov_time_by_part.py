#!/usr/bin/env python
"""Where an OpenVINO UNet call spends its time, grouped by the part of the UNet each runtime node came from
(convolutions, GroupNorm, attention, time embedding, the rest), from the CPU plugin's performance counters.
`pqcad-export bench --profile` lists the same counters per op type; this groups them by layer, which is what
docs/RESULTS.md "Speed against the FP engines" compares between the FP model and the INT8 export (issue 22).

Usage: python -m research.ov_time_by_part MODEL.onnx [MODEL2.onnx ...] [--batch 8] [--threads 2] [--iters 20]
Each file is profiled in its own process, one after another; the counters slow the run and their sum is not the
wall time, so compare shares rather than absolute milliseconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

PARTS = ("conv", "groupnorm", "attention", "time embedding", "other (adds, concat, resize, quantize)")


def _part(op, node_type: str) -> str:
    """The UNet part a runtime node belongs to, from the ONNX layer names it was fused from."""
    names = _origin(op)
    if node_type == "Reorder":  # a layout change belongs to what it feeds or is fed by
        names = ",".join([_origin(op.input_value(0).get_node())]
                         + [_origin(t.get_node()) for t in op.output(0).get_target_inputs()])
    if "attentions" in names and not re.search(r"attentions\.\d+/(group_)?norm", names):
        return "attention"
    if re.search(r"norm|nonlinearity", names) or node_type == "MVN":
        return "groupnorm"
    if node_type in ("Convolution", "GroupConvolution"):
        return "conv"
    if re.search(r"time_emb|time_embedding|time_proj", names):
        return "time embedding"
    return PARTS[-1]


def _origin(op) -> str:
    info = op.get_rt_info()
    return info["originalLayersNames"].astype(str) if "originalLayersNames" in info else op.get_friendly_name()


def profile(path: str, batch: int, threads: int, iters: int) -> dict[str, float]:
    """ms per call per part (this process)."""
    from engines.openvino import OvConfig, compile_onnx
    from engines.profile import sample_feeds

    compiled = compile_onnx(path, OvConfig(threads=threads), {"PERF_COUNT": "YES"}, batch=batch)
    ops = {op.get_friendly_name(): op for op in compiled.get_runtime_model().get_ops()}
    req = compiled.create_infer_request()
    feeds = sample_feeds(path, batch)
    for _ in range(5):
        req.infer(feeds)
    out: dict[str, float] = collections.defaultdict(float)
    for _ in range(iters):
        req.infer(feeds)
        for p in req.profiling_info:
            if p.status == p.Status.EXECUTED:
                out[_part(ops[p.node_name], p.node_type)] += p.real_time.total_seconds() * 1e3 / iters
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx", nargs="+")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # worker: profile onnx[0], print JSON
    a = ap.parse_args()
    if a.one:
        print(json.dumps(profile(a.onnx[0], a.batch, a.threads, a.iters)))
        return
    cols = {}
    for f in a.onnx:
        r = subprocess.run([sys.executable, "-m", "research.ov_time_by_part", f, "--one", "--batch", str(a.batch),
                            "--threads", str(a.threads), "--iters", str(a.iters)], capture_output=True, text=True,
                           cwd=str(Path(__file__).resolve().parents[1]))
        if r.returncode:
            sys.exit(f"error: profiling {f} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        cols[f] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"ms per call by part (OpenVINO counters, batch {a.batch}, {a.threads} threads)")
    for f in a.onnx:
        print(f"  [{list(a.onnx).index(f) + 1}] {f}")
    print(f"{'part':40s}" + "".join(f"{'[' + str(i + 1) + ']':>9s}" for i in range(len(a.onnx))))
    for part in PARTS + ("sum",):
        vals = [sum(c.values()) if part == "sum" else c.get(part, 0.0) for c in cols.values()]
        print(f"{part:40s}" + "".join(f"{v:9.2f}" for v in vals))


if __name__ == "__main__":
    main()
