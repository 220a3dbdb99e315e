"""Where the time of one UNet call goes, per op type: OpenVINO performance counters (PERF_COUNT) and ONNX
Runtime's profiler (enable_profiling). Used to find what makes an INT8 graph slow around its convolutions
(`pqcad-export bench --profile`)."""

from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def sample_feeds(path: str | Path, batch: int) -> dict[str, np.ndarray]:
    """Seeded inputs for one call of an exported UNet at `batch` (sample, timestep): what profiles feed."""
    import onnx

    from .onnxruntime import _input_meta

    ins, _, shape, t_dtype = _input_meta(onnx.load(str(path), load_external_data=False))
    f = {ins[0]: np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)}
    if "timestep" in ins:
        f["timestep"] = np.linspace(1, 999, batch).round().astype(t_dtype)
    return f


def _table(agg: dict[str, float], count: collections.Counter, calls: int, top: int) -> list[dict[str, Any]]:
    total = sum(agg.values()) or 1.0
    rows = sorted(agg.items(), key=lambda kv: -kv[1])[:top]
    return [{"op": k, "ms_per_call": round(v / calls, 4), "share": round(v / total, 4), "nodes": count[k] // calls}
            for k, v in rows]


def openvino_ops(path: str | Path, batch: int = 8, precision: str = "default", threads: int = 0,
                 iters: int = 10, top: int = 15, static_batch: bool = True) -> list[dict[str, Any]]:
    """Per (runtime layer type, kernel) time of the compiled model, summed over nodes, per call (compiled for
    `batch`'s static shape unless static_batch is False, as the engine and the timed rows run)."""
    from .openvino import OvConfig, compile_onnx

    compiled = compile_onnx(path, OvConfig(precision=precision, threads=threads), {"PERF_COUNT": "YES"},
                            batch=batch if static_batch else None)
    req = compiled.create_infer_request()
    f = sample_feeds(path, batch)
    for _ in range(3):
        req.infer(f)
    agg: dict[str, float] = collections.defaultdict(float)
    cnt: collections.Counter = collections.Counter()
    for _ in range(iters):
        req.infer(f)
        for p in req.profiling_info:
            k = f"{p.node_type} ({p.exec_type})"
            agg[k] += p.real_time.total_seconds() * 1e3
            cnt[k] += 1
    return _table(agg, cnt, iters, top)


def onnxruntime_ops(path: str | Path, batch: int = 8, level: str = "extended", threads: int = 0,
                    iters: int = 10, top: int = 15) -> list[dict[str, Any]]:
    """Per op type time of an ONNX Runtime session (its JSON profile's node events), per call."""
    from .onnxruntime import OrtConfig, _ort, session_options

    cfg = OrtConfig(optimization_level=level, intra_op_threads=threads, provider="cpu")
    with tempfile.TemporaryDirectory() as td:
        so = session_options(cfg, profile=True)
        so.profile_file_prefix = os.path.join(td, "ort")
        sess = _ort().InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        f = sample_feeds(path, batch)
        for _ in range(3 + iters):
            sess.run(None, f)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    cutoff = runs[2]["ts"] + runs[2]["dur"] if len(runs) > 3 else 0  # leave the 3 warm-up calls out
    agg: dict[str, float] = collections.defaultdict(float)
    cnt: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= cutoff:
            k = e.get("args", {}).get("op_name", "?")
            agg[k] += e["dur"] / 1e3
            cnt[k] += 1
    return _table(agg, cnt, iters, top)
