"""Everything after ONNX: TensorRT / TensorRT-RTX / ONNX Runtime / OpenVINO engines, manifests and latency.

Never imports pqcad_export.cli; the pipeline and the `engine` command compose these functions.
"""

from __future__ import annotations

import enum
from pathlib import Path
from .base import Engine, LatencyStats
from .manifest import EngineInfo, engine_bytes, read_manifest


class Backend(str, enum.Enum):
    """Engine backends; the CLI derives its --backend choices from this."""

    AUTO = "auto"
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


BACKENDS = tuple(b.value for b in Backend)
CPU_FASTEST = "fastest-cpu"  # resolve_backend's answer for auto on a CPU with OpenVINO: measured at build time
AUTO_BATCH = 8               # batch of the build-time measurement (a few UNet calls per engine)


class EngineError(RuntimeError):
    """A backend problem a user can fix (missing library, rejected graph); one line."""


def gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve_backend(backend: str = "auto") -> tuple[str, str]:
    """(backend, reason). auto = TensorRT when importable and a GPU is present; else, when OpenVINO is importable,
    CPU_FASTEST (build_engine builds ONNX Runtime and OpenVINO and keeps the faster), else ONNX Runtime."""
    from .tensorrt import TensorRTUnavailable, import_tensorrt

    backend = getattr(backend, "value", backend)
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
    from .openvino import openvino_available

    if openvino_available():
        return CPU_FASTEST, f"{reason}; the faster of ONNX Runtime and OpenVINO, measured at build time"
    return "onnxruntime", f"{reason}; openvino not importable; using ONNX Runtime"


def build_engine(onnx_path: str | Path, out_dir: str | Path, backend: str = "auto", trt_config=None,
                 ort_config=None, calib_feeds=None, ov_config=None) -> EngineInfo:
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
    elif chosen == CPU_FASTEST:
        from .select import build_fastest_cpu

        info, reason = build_fastest_cpu(onnx_path, out_dir, ort_config, ov_config, calib_feeds, AUTO_BATCH)
        chosen = info.backend
    elif chosen == "openvino":
        from .openvino import OpenVinoUnavailable, build_ov_engine

        try:
            info = build_ov_engine(onnx_path, out_dir, ov_config)
        except OpenVinoUnavailable as exc:
            raise EngineError(f"backend openvino requested but {exc}; pip install openvino") from None
        except RuntimeError as exc:
            raise EngineError(f"OpenVINO could not compile {onnx_path}: {str(exc).strip().splitlines()[0]}") from None
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
    if info.backend == "openvino":
        from .openvino import OpenVinoUnavailable, OvEngine

        try:
            return OvEngine(engine_dir, **kwargs)
        except OpenVinoUnavailable as exc:
            raise EngineError(str(exc)) from None
    from .tensorrt import TensorRTUnavailable, TrtEngine

    try:
        return TrtEngine(engine_dir)
    except TensorRTUnavailable as exc:
        raise EngineError(str(exc)) from None


__all__ = ["Backend", "Engine", "EngineInfo", "EngineError", "engine_bytes", "LatencyStats", "BACKENDS", "CPU_FASTEST", "build_engine", "load_engine",
           "resolve_backend", "gpu_available"]
