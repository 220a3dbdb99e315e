"""compare's FP engine references: the FP teacher at its 100 steps on the engine families a CPU deployment would
use instead of INT8 (ONNX Runtime FP32 with ORT_ENABLE_ALL, OpenVINO at its default inference precision, which
is bf16 on an AVX-512 BF16 CPU), so the headline speed-up is measured against the fastest FP engine, not against
PyTorch. Per-call latency: every CPU engine (these and the candidates) in its own process, taking turns in one
engines.bench run (pipeline/compare.py); per-image latency: complete DDIM runs with only that engine loaded here.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import PqcadError


@dataclass
class RefSpec:
    name: str
    backend: str
    engine_dir: Path


def build_references(teacher, work: Path, notes: list[str]) -> list[tuple[RefSpec, Optional[str]]]:
    """Export the FP teacher to plain ONNX once and build its ORT FP32 and OpenVINO engines under `work`.
    Returns (spec, error or None) per reference; an error becomes a null entry with a note."""
    from engines import EngineError, build_engine
    from engines.onnxruntime import OrtConfig

    from ..export.fp import export_fp_onnx

    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / "fp32.onnx"
    try:
        export_fp_onnx(teacher.unet, onnx_path)
    except PqcadError as exc:
        notes.append(f"FP engine references: {exc}")
        return []
    out = []
    for name, backend, kw in (("fp32-onnxruntime", "onnxruntime",
                               {"ort_config": OrtConfig(mode="qdq", optimization_level="all", provider="cpu")}),
                              ("fp-openvino", "openvino", {})):
        spec = RefSpec(name, backend, work / backend)
        try:
            build_engine(onnx_path, spec.engine_dir, backend, **kw)
            out.append((spec, None))
        except (EngineError, PqcadError) as exc:
            out.append((spec, str(exc)))
    return out


def measure_reference(spec: RefSpec, err: Optional[str], call_ms: Optional[float], teacher, cfg, shape,
                      device: torch.device, time_sampler: Callable, entry: Callable,
                      ref_imgs_fn: Optional[Callable]) -> dict[str, Any]:
    """One compare.json reference entry (name, backend, precision, steps, unet_ms_per_call, ms_per_image, fid,
    fid_to_fp32, model_bytes, notes); nulls with a note where it could not run. `call_ms`: its per-call latency
    from compare's joint run of the CPU engines (None: timed here, alone in its own process)."""
    from engines import engine_bytes, load_engine
    from engines.bench import BenchTarget, measure_isolated

    steps = cfg.teacher_steps
    if err is not None:
        e = entry(spec.name, spec.backend, "n/a", steps, None, None, None)
        e["notes"] = [f"not measured: {err}"]
        return e
    eng = load_engine(spec.engine_dir)
    prec = "fp32"
    if spec.backend == "openvino":
        prec = eng.inference_precision
    size = engine_bytes(spec.engine_dir)
    notes = []
    try:
        ms = call_ms or measure_isolated(BenchTarget(spec.name, "engine", str(spec.engine_dir)), cfg.latency_batch,
                                         0, cfg.warmup, cfg.latency_iters)["median_ms"]
    except RuntimeError as exc:
        ms = None
        notes.append(f"unet_ms_per_call: {exc}")
    ms_img = time_sampler(eng, teacher.scheduler_config, shape, steps, cfg.latency_batch, cfg.eta, device,
                          cfg.image_runs)
    e = entry(spec.name, spec.backend, prec, steps, ms, ms_img, size)
    e["engine_dir"] = str(spec.engine_dir)
    if ref_imgs_fn is not None:
        e["_images"] = ref_imgs_fn(eng)
    else:
        notes.append("fid, fid_to_fp32: not sampled (latency reference; the same FP weights as the PyTorch FP32 "
                     "reference, at the engine's precision)")
    e["notes"] = notes
    del eng
    gc.collect()
    return e


def fastest(entries: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The reference with the lowest ms_per_image (ties: listed first)."""
    timed = [e for e in entries if e.get("ms_per_image")]
    return min(timed, key=lambda e: e["ms_per_image"]) if timed else None


FP_TARGET_PREFIXES = ("fp32-", "fp-")  # the FP rows of a bench report (bench_targets' names)


def fastest_fp_row(report: dict[str, Any], batch: int) -> Optional[dict[str, Any]]:
    """The FP row of an engines.bench report with the lowest median at `batch` (what INT8 is judged against)."""
    fps = [r for r in report["rows"] if r["batch"] == batch and r["name"].startswith(FP_TARGET_PREFIXES)]
    return min(fps, key=lambda r: r["median_ms"], default=None)


def bench_targets(onnx_file, model, workdir: Path, fp: bool = True, ort_int8: bool = True, dynamic: bool = False):
    """The comparison the project is judged by: the QDQ export on OpenVINO and on the ONNX Runtime INT8 engine,
    and the FP model (plain ONNX) on ONNX Runtime FP32 and OpenVINO at its default precision. OpenVINO compiles
    each batch's static shape, as its engine does; `dynamic` adds both OpenVINO models with a dynamic batch."""
    from engines.bench import BenchTarget

    targets = []
    if fp:
        from ..export.fp import export_fp_onnx
        from ..model_io import load_model

        fp_onnx = export_fp_onnx(load_model(model).unet, workdir / "fp32.onnx")
        targets += [BenchTarget("fp32-onnxruntime", "onnxruntime", str(fp_onnx), "fp32", "all"),
                    BenchTarget("fp-openvino", "openvino", str(fp_onnx))]
        if dynamic:
            targets.append(BenchTarget("fp-openvino-dynamic", "openvino", str(fp_onnx), static_batch=False))
    if onnx_file:
        targets.append(BenchTarget("int8-openvino", "openvino", str(onnx_file)))
        if dynamic:
            targets.append(BenchTarget("int8-openvino-dynamic", "openvino", str(onnx_file), static_batch=False))
        if ort_int8:
            from engines import build_engine

            build_engine(onnx_file, workdir / "ort_int8", "onnxruntime")
            targets.append(BenchTarget("int8-onnxruntime", "engine", str(workdir / "ort_int8")))
    return targets
