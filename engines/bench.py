"""Latency benchmark that isolates engines: one subprocess per (engine, batch), taking turns.

Why: two sessions timed in one process (or round-robin) share caches, thread pools and allocator state; on a
2-core machine that put an ONNX Runtime engine at 3x its own latency. Here each (engine, batch) is a
`python -m engines.bench` process that loads one engine and warms it up; then the processes take turns, a few
calls each in rotating order, while the others block on their input, for `rounds` rounds; `reps` repetitions
start fresh processes. Why turns: on this shared 2-core VM one engine's speed drifts 20-30 % over tens of seconds,
so engines timed one after another (a process each, seconds apart) saw different machines; turns a fraction of a
second apart see the same one, and a ratio is taken per round. The report gives medians, the spread over
repetitions, the per-round medians, the CPU ISA, thread count and load average.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .base import cpu_info, cpu_isa, summarize_ms

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


class _Worker:
    """One target at one batch, loaded once in its own process; it times calls only when asked, so the other
    workers sit idle (blocked on their stdin) while it runs."""

    def __init__(self, target: BenchTarget, batch: int, threads: int, warmup: int, seed: int, timeout: float):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        job = json.dumps({"target": target.to_dict(), "batch": batch, "threads": threads, "warmup": warmup,
                          "seed": seed})
        self.what, self.timeout = f"{target.name} at batch {batch}", timeout
        self._err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: warnings cannot fill it and block
        self.proc = subprocess.Popen([sys.executable, "-m", "engines.bench", job], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env, cwd=str(REPO_ROOT))
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.info = self._read()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # the process ended

    def _read(self) -> Any:
        """The worker's next JSON line (other output, e.g. a library's notice, is skipped)."""
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
                if line is None or line.startswith(("{", "[")):
                    break
        except queue.Empty:
            line = None
        if line is None:
            self._stop()
            self._err.seek(0)
            err = (self._err.read().strip().splitlines() or ["no output"])[-1]
            self.close()
            raise RuntimeError(f"benchmark of {self.what} failed: {err}")
        return json.loads(line)

    def time(self, n: int) -> list[float]:
        """n timed calls (after one untimed call that re-warms caches the other workers used)."""
        try:
            self.proc.stdin.write(f"{n}\n")
            self.proc.stdin.flush()
        except OSError:  # it died: _read reports its last error line
            pass
        return self._read()

    def _stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self._stop()
        self._err.close()


def measure_isolated(target: BenchTarget, batch: int, threads: int, warmup: int, iters: int, seed: int = 0,
                     timeout: float = 600) -> dict[str, Any]:
    """One target timed alone in a fresh process (no other session shares it): median, min, p90 of `iters`
    calls after `warmup`."""
    w = _Worker(target, batch, threads, warmup, seed, timeout)
    try:
        st = summarize_ms(w.time(iters), batch, warmup, "perf_counter")
    finally:
        w.close()
    return {"name": target.name, "batch": batch, "backend": w.info["backend"], "precision": w.info["precision"],
            "median_ms": st.median_ms, "min_ms": st.min_ms, "p90_ms": st.p90_ms, "load_s": w.info["load_s"],
            "pid": w.info["pid"]}


def run_bench(targets: list[BenchTarget], batches: list[int], reps: int = 3, threads: int = 0, warmup: int = 5,
              iters: int = 50, seed: int = 0, rounds: int = 5, gap_s: float = 0.1,
              progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Isolated, interleaved measurements; returns the JSON-ready report (see module docstring)."""
    if reps < 1 or iters < 1 or rounds < 1:
        raise ValueError("reps, rounds and iters must be >= 1")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"target names must be unique: {names}")
    threads = threads or (os.cpu_count() or 1)
    rounds = min(rounds, iters)
    per_round = [iters // rounds + (1 if k < iters % rounds else 0) for k in range(rounds)]
    pairs = [(t, b) for b in batches for t in targets]
    rounds_ms: dict[tuple[str, int], list[list[float]]] = {(t.name, b): [] for t, b in pairs}
    mins: dict[tuple[str, int], float] = {}
    infos: dict[tuple[str, int], list[dict]] = {(t.name, b): [] for t, b in pairs}
    load_before = os.getloadavg()
    for r in range(reps):
        workers: dict[tuple[str, int], _Worker] = {}
        try:
            for t, b in pairs:  # loaded one after another, so no compile overlaps another's timing
                if progress:
                    progress(f"rep {r + 1}/{reps}: loading {t.name} batch {b}")
                workers[(t.name, b)] = _Worker(t, b, threads, warmup, seed, 600)
            for key in rounds_ms:
                rounds_ms[key].append([])
            for k, n in enumerate(per_round):
                j = (r * rounds + k) % len(pairs)
                for t, b in pairs[j:] + pairs[:j]:  # rotate the order so no engine always runs first or last
                    if progress:
                        progress(f"rep {r + 1}/{reps}, round {k + 1}/{rounds}: {t.name} batch {b}")
                    time.sleep(gap_s)  # let the previous worker's threads go idle
                    ms = workers[(t.name, b)].time(n)
                    rounds_ms[(t.name, b)][-1].append(statistics.median(ms))
                    mins[(t.name, b)] = min(mins.get((t.name, b), float("inf")), min(ms))
        finally:
            for key, w in workers.items():
                w.close()
                infos[key].append(w.info)
    rows = []
    for t in targets:
        for b in batches:
            rs, info = rounds_ms[(t.name, b)], infos[(t.name, b)]
            flat = [x for rep in rs for x in rep]
            m = statistics.median(flat)
            med = [statistics.median(rep) for rep in rs]
            rows.append({"name": t.name, "batch": b, "backend": info[0]["backend"],
                         "precision": info[0]["precision"], "source": t.path, "median_ms": round(m, 4),
                         "ms_per_sample": round(m / b, 4), "rep_medians_ms": [round(x, 4) for x in med],
                         "round_medians_ms": [[round(x, 4) for x in rep] for rep in rs],
                         "min_ms": round(mins[(t.name, b)], 4),
                         "spread": round((max(med) - min(med)) / m, 4) if m else None,
                         "pids": [x["pid"] for x in info]})
    return {"rows": rows, "cpu": cpu_info()[0], "cpu_isa": cpu_isa(), "cores": os.cpu_count(), "threads": threads,
            "reps": reps, "rounds": rounds, "iters": iters, "warmup": warmup, "batches": list(batches),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "versions": _versions(),
            "method": f"{reps} repetitions; in each, one process per (engine, batch), all loaded ({warmup} warm-up "
                      f"calls), then {rounds} rounds in which the processes take turns in rotating order, each "
                      f"timing its share of {iters} calls while the others wait; median_ms = median of all round "
                      "medians, spread = (max - min) / median of the repetitions' medians; a ratio between two rows "
                      "is the median of their per-round ratios (within a round the engines run back to back)",
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
    """How many times faster `faster` is than `slower` at `batch`: the median of the per-round ratios where both
    rows have them (paired turns cancel the machine's slow drifts), else median over median; None if missing."""
    st = ratio_stats(report, slower, faster, batch)
    return st["median"] if st else None


def ratio_stats(report: dict[str, Any], slower: str, faster: str, batch: int) -> Optional[dict[str, Any]]:
    """{median, p25, p75, rounds} of the per-round ratios slower / faster (p25 = p75 = median and rounds = 0 for
    a report without round medians); None if a row is missing."""
    a, b = row(report, slower, batch), row(report, faster, batch)
    if not (a and b and b["median_ms"]):
        return None
    ra, rb = a.get("round_medians_ms"), b.get("round_medians_ms")
    if ra and rb and [len(x) for x in ra] == [len(x) for x in rb]:
        q = np.array([x / y for pa, pb in zip(ra, rb) for x, y in zip(pa, pb)])
        p25, med, p75 = (round(float(v), 3) for v in np.percentile(q, [25, 50, 75]))
        return {"median": med, "p25": p25, "p75": p75, "rounds": int(q.size)}
    m = round(a["median_ms"] / b["median_ms"], 3)
    return {"median": m, "p25": m, "p75": m, "rounds": 0}


def _worker(job_json: str) -> None:
    """Body of one worker process: load, warm up, say ready; then per stdin line `n`, one untimed and n timed
    calls, answered as a JSON list of milliseconds; exits at end of input."""
    job = json.loads(job_json)
    t0 = time.perf_counter()
    make, backend, prec = _runner(BenchTarget(**job["target"]), job["threads"], job["batch"])
    call = make(job["batch"], job.get("seed", 0))
    load_s = time.perf_counter() - t0
    for _ in range(max(0, job["warmup"])):
        call()
    print(json.dumps({"backend": backend, "precision": prec, "load_s": round(load_s, 3), "pid": os.getpid()}),
          flush=True)
    for line in sys.stdin:
        call()
        out = []
        for _ in range(max(1, int(line))):
            t = time.perf_counter()
            call()
            out.append(round((time.perf_counter() - t) * 1e3, 4))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
