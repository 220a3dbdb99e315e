"""Latency benchmark that isolates engines: one subprocess per (engine, batch), repetitions interleaved.

Why: two sessions timed in one process (or round-robin) share caches, thread pools and allocator state; on a
2-core machine that put an ONNX Runtime engine at 3x its own latency. Here each measurement is a fresh
`python -m engines.bench` process that loads one engine, warms it up and times `iters` calls at one batch; the
(engine, batch) pairs are visited in a rotating order `reps` times, and the report gives the median of the
per-process medians plus their spread, with the CPU ISA, thread count and load average recorded.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .base import cpu_info, cpu_isa, time_cpu

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchTarget:
    """One thing to time: an engine directory (backend "engine") or an ONNX file run by onnxruntime / openvino."""

    name: str
    backend: str                 # engine | onnxruntime | openvino
    path: str
    precision: str = "default"   # openvino: INFERENCE_PRECISION_HINT (default = plugin's choice); else a label
    level: str = "all"           # onnxruntime graph optimization level for a plain ONNX file
    static_batch: bool = True    # openvino: compile for the measured batch only (the engine's default too)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, spec: str) -> "BenchTarget":
        """NAME=BACKEND:PATH[@PRECISION], e.g. ov-int8=openvino:run/export/unet.onnx or ours=engine:run/engine."""
        name, sep, rest = spec.partition("=")
        backend, sep2, path = rest.partition(":")
        if not (sep and sep2 and name and path) or backend not in ("engine", "onnxruntime", "openvino"):
            raise ValueError(f"bad target {spec!r}: expected NAME=engine|onnxruntime|openvino:PATH[@PRECISION]")
        path, _, prec = path.partition("@")
        return cls(name=name, backend=backend, path=path, precision=prec or "default")


def _runner(t: BenchTarget, threads: int, batch: int) -> tuple[Callable[[int, int], Callable[[], object]], str, str]:
    """(make_call(batch, seed) -> call, backend that runs, precision that runs) for one target at `batch`, in this
    process (a static-batch OpenVINO target is compiled once, for that batch)."""
    from .onnxruntime import OrtConfig, _input_meta, make_session

    backend, path, prec = t.backend, Path(t.path), t.precision
    if backend == "engine":
        from .manifest import read_manifest

        info = read_manifest(path)
        backend = info.backend
        if backend == "openvino":
            prec = info.options.get("precision", "default")
            # as the engine runs (OvEngine): a manifest without the key predates the option, dynamic
            t = BenchTarget(**{**t.to_dict(), "static_batch": bool(info.options.get("static_batch", False))})
        path = info.path
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ins, _, shape, t_dtype = _input_meta(model)
    int8 = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    del model
    if shape is None:
        raise ValueError(f"{path}: no static sample shape")

    def feeds(batch: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        f = {ins[0]: rng.standard_normal((batch, *shape)).astype(np.float32)}
        if "timestep" in ins:
            f["timestep"] = np.linspace(1, 999, batch).round().astype(t_dtype)
        return f

    if backend == "openvino":
        from .openvino import OvConfig, compile_onnx, inference_precision

        cfg = OvConfig(precision=prec, threads=threads)
        compiled = compile_onnx(path, cfg, batch=batch if t.static_batch else None)
        label = ("int8+" if int8 else "") + inference_precision(compiled)  # float parts run at this precision

        def make(b, s):
            req = compiled.create_infer_request()
            return lambda f=feeds(b, s): req.infer(f)

        return make, "openvino", label + ("" if t.static_batch else " dynamic")
    if backend == "onnxruntime":
        level = t.level
        if t.backend == "engine":
            level = (read_manifest(t.path).options or {}).get("optimization_level", "extended")
        sess = make_session(path, OrtConfig(optimization_level=level, intra_op_threads=threads, provider="cpu"))
        label = prec if prec != "default" else ("int8" if int8 else "fp32")
        return (lambda b, s: (lambda f=feeds(b, s): sess.run(None, f))), "onnxruntime", label
    raise ValueError(f"cannot benchmark backend {backend!r} on the CPU")


def measure_in_process(target: BenchTarget, batch: int, threads: int, warmup: int, iters: int,
                       seed: int = 0) -> dict[str, Any]:
    """Load one target and time it (the body of one isolated worker process)."""
    t0 = time.perf_counter()
    make, backend, prec = _runner(target, threads, batch)
    load_s = time.perf_counter() - t0
    st = time_cpu(make(batch, seed), batch, warmup, iters)
    return {"name": target.name, "batch": batch, "backend": backend, "precision": prec,
            "median_ms": st.median_ms, "min_ms": st.min_ms, "p90_ms": st.p90_ms, "load_s": round(load_s, 3),
            "pid": os.getpid()}


def measure_isolated(target: BenchTarget, batch: int, threads: int, warmup: int, iters: int, seed: int = 0,
                     timeout: float = 600) -> dict[str, Any]:
    """measure_in_process in a fresh Python process (so no other session shares it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    job = json.dumps({"target": target.to_dict(), "batch": batch, "threads": threads, "warmup": warmup,
                      "iters": iters, "seed": seed})
    p = subprocess.run([sys.executable, "-m", "engines.bench", job], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=str(REPO_ROOT))
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark of {target.name} at batch {batch} failed: {err}")
    return json.loads(lines[-1])


def run_bench(targets: list[BenchTarget], batches: list[int], reps: int = 3, threads: int = 0, warmup: int = 5,
              iters: int = 50, seed: int = 0, progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Interleaved, isolated measurements; returns the JSON-ready report (see module docstring)."""
    if reps < 1 or iters < 1:
        raise ValueError("reps and iters must be >= 1")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"target names must be unique: {names}")
    threads = threads or (os.cpu_count() or 1)
    runs: dict[tuple[str, int], list[dict]] = {(t.name, b): [] for t in targets for b in batches}
    load_before = os.getloadavg()
    pairs = [(t, b) for b in batches for t in targets]
    for r in range(reps):
        k = r % len(pairs)
        for t, b in pairs[k:] + pairs[:k]:  # rotate the order so no engine always runs first or last
            if progress:
                progress(f"rep {r + 1}/{reps}: {t.name} batch {b}")
            runs[(t.name, b)].append(measure_isolated(t, b, threads, warmup, iters, seed))
    rows = []
    for t in targets:
        for b in batches:
            rs = runs[(t.name, b)]
            med = [x["median_ms"] for x in rs]
            m = statistics.median(med)
            rows.append({"name": t.name, "batch": b, "backend": rs[0]["backend"], "precision": rs[0]["precision"],
                         "source": t.path, "median_ms": round(m, 4), "ms_per_sample": round(m / b, 4),
                         "rep_medians_ms": [round(x, 4) for x in med], "min_ms": round(min(x["min_ms"] for x in rs), 4),
                         "spread": round((max(med) - min(med)) / m, 4) if m else None,
                         "pids": [x["pid"] for x in rs]})
    return {"rows": rows, "cpu": cpu_info()[0], "cpu_isa": cpu_isa(), "cores": os.cpu_count(), "threads": threads,
            "reps": reps, "iters": iters, "warmup": warmup, "batches": list(batches),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "versions": _versions(),
            "method": f"one process per (engine, batch) and repetition; {warmup} warm-up + {iters} timed calls each; "
                      f"{reps} interleaved repetitions in rotating order; median_ms = median of the repetitions' "
                      "medians, spread = (max - min) / median of those",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("onnxruntime", "openvino"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception:
            out[mod] = "not installed"
    return out


def row(report: dict[str, Any], name: str, batch: int) -> Optional[dict[str, Any]]:
    return next((r for r in report["rows"] if r["name"] == name and r["batch"] == batch), None)


def ratio(report: dict[str, Any], slower: str, faster: str, batch: int) -> Optional[float]:
    """median(slower) / median(faster) at `batch` (how many times faster `faster` is), None if missing."""
    a, b = row(report, slower, batch), row(report, faster, batch)
    return round(a["median_ms"] / b["median_ms"], 3) if a and b and b["median_ms"] else None


def _worker(job_json: str) -> None:
    job = json.loads(job_json)
    res = measure_in_process(BenchTarget(**job["target"]), job["batch"], job["threads"], job["warmup"], job["iters"],
                             job.get("seed", 0))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
