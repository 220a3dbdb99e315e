"""Everything after ONNX: TensorRT / TensorRT-RTX / ONNX Runtime engines, manifests and latency.

Never imports pqcad_export.cli; the pipeline and the `engine` command compose these functions.
"""

from __future__ import annotations

from pathlib import Path
from .base import Engine, LatencyStats
from .manifest import EngineInfo, read_manifest

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx", "onnxruntime")


class EngineError(RuntimeError):
    """A backend problem a user can fix (missing library, rejected graph); one line."""


def gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve_backend(backend: str = "auto") -> tuple[str, str]:
    """(backend, reason). auto = TensorRT when importable and a GPU is present, else ONNX Runtime."""
    from .tensorrt import TensorRTUnavailable, import_tensorrt

    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, "requested"
    try:
        import_tensorrt("tensorrt")
        trt_ok, why = True, ""
    except TensorRTUnavailable as exc:
        trt_ok, why = False, str(exc)
    if trt_ok and gpu_available():
        return "tensorrt", "tensorrt importable and a CUDA GPU is present"
    reason = why if not trt_ok else "no CUDA GPU visible"
    return "onnxruntime", f"{reason}; using ONNX Runtime"


def build_engine(onnx_path: str | Path, out_dir: str | Path, backend: str = "auto", trt_config=None,
                 ort_config=None, calib_feeds=None) -> EngineInfo:
    """Build an engine directory (plan or ORT model + engine.json) from a QDQ ONNX file.

    calib_feeds ({"sample", "timestep"[, "encoder_hidden_states"]} numpy arrays, e.g. from C_QC) calibrate the
    ORT CPU copy's Conv-output requantization; default N(0,1) samples over t in [0, 999]."""
    from .tensorrt import TensorRTBuildError, TensorRTUnavailable, TrtConfig, build_trt_engine

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EngineError(f"no such ONNX file: {onnx_path}")
    chosen, reason = resolve_backend(backend)
    if chosen in ("tensorrt", "tensorrt-rtx"):
        cfg = trt_config or TrtConfig(compute_capability="SM89" if chosen == "tensorrt-rtx" else None)
        from .tensorrt import import_tensorrt

        try:
            import_tensorrt(chosen)
        except TensorRTUnavailable as exc:
            raise EngineError(f"backend {chosen} requested but {exc}; install the [{chosen}] extra") from None
        if chosen == "tensorrt" and not gpu_available():
            raise EngineError("backend tensorrt needs a CUDA GPU to build (none visible); use "
                              "--backend onnxruntime, or tensorrt-rtx for an ahead-of-time SM89 build")
        try:
            info = build_trt_engine(onnx_path, out_dir, cfg, flavor=chosen)
        except TensorRTUnavailable as exc:
            raise EngineError(f"backend {chosen} requested but {exc}; install the [{chosen}] extra") from None
        except TensorRTBuildError as exc:
            raise EngineError(str(exc).splitlines()[0]) from None
    else:
        from .onnxruntime import build_ort_engine

        info = build_ort_engine(onnx_path, out_dir, ort_config, calib_feeds)
    info.notes.insert(0, f"backend {chosen}: {reason}")
    from .manifest import write_manifest

    write_manifest(info, out_dir)
    return info


def load_engine(engine_dir: str | Path, **kwargs) -> Engine:
    """Load a built engine directory as a runnable Engine (a pqcad_export.sampling.UNetFn)."""
    try:
        info = read_manifest(engine_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise EngineError(f"not an engine directory: {engine_dir} ({exc})") from None
    if info.backend == "onnxruntime":
        from .onnxruntime import OrtEngine

        return OrtEngine(engine_dir, **kwargs)
    from .tensorrt import TensorRTUnavailable, TrtEngine

    try:
        return TrtEngine(engine_dir)
    except TensorRTUnavailable as exc:
        raise EngineError(str(exc)) from None


__all__ = ["Engine", "EngineInfo", "EngineError", "LatencyStats", "BACKENDS", "build_engine", "load_engine",
           "resolve_backend", "gpu_available"]
