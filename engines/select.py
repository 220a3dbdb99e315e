"""`--backend auto` on a CPU: build the ONNX Runtime and the OpenVINO engine, time both (isolated processes,
interleaved) and keep the faster one. Which CPU engine wins depends on the CPU and the graph (on an AVX-512 VNNI
EPYC OpenVINO ran the same W4A8 export 1.5x faster than ONNX Runtime's INT8 copy), so it is measured, not assumed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from .manifest import EngineInfo, read_manifest, write_manifest


def build_fastest_cpu(onnx_path: str | Path, out_dir: str | Path, ort_config=None, ov_config=None,
                      calib_feeds=None, batch: int = 8, reps: int = 2, iters: int = 5) -> tuple[EngineInfo, str]:
    """Build both CPU engines, measure each at `batch`, move the faster into out_dir; returns (info, reason).
    engine.json's options["auto"] records both measurements and the choice."""
    from .bench import BenchTarget, run_bench
    from .onnxruntime import build_ort_engine
    from .openvino import build_ov_engine

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".auto_", dir=out))
    try:
        built: dict[str, EngineInfo] = {}
        failures: dict[str, str] = {}
        for name, build in (("onnxruntime", lambda d: build_ort_engine(onnx_path, d, ort_config, calib_feeds)),
                            ("openvino", lambda d: build_ov_engine(onnx_path, d, ov_config))):
            try:
                built[name] = build(work / name)
            except Exception as exc:  # one backend failing to build leaves the other
                failures[name] = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if not built:
            from . import EngineError

            raise EngineError(f"no CPU engine could be built: {failures}")
        ms: dict[str, Optional[float]] = {}
        if len(built) > 1:
            rep = run_bench([BenchTarget(n, "engine", str(work / n)) for n in built], [batch], reps=reps, warmup=2,
                            iters=iters)
            ms = {r["name"]: r["median_ms"] for r in rep["rows"]}
            chosen = min(ms, key=ms.get)
            other = next(n for n in ms if n != chosen)
            reason = (f"measured faster on this CPU: {ms[chosen]:.1f} ms vs {ms[other]:.1f} ms ({other}) per UNet "
                      f"call at batch {batch} (each in its own process, taking turns; {reps} x {iters} calls)")
        else:
            chosen = next(iter(built))
            reason = f"the only CPU engine that built ({'; '.join(f'{k}: {v}' for k, v in failures.items())})"
        for f in (work / chosen).iterdir():
            dst = out / f.name
            if dst.exists():
                dst.unlink() if dst.is_file() else shutil.rmtree(dst)
            shutil.move(str(f), str(dst))
        info = read_manifest(out)
        auto: dict[str, Any] = {"chosen": chosen, "reason": reason, "batch": batch, "ms_per_call": ms,
                                "failed": failures}
        info.options = {**(info.options or {}), "auto": auto}
        write_manifest(info, out)
        return info, reason
    finally:
        shutil.rmtree(work, ignore_errors=True)
