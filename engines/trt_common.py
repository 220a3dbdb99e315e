"""What the TensorRT build and run paths share: the library flavours and their import, the build options
(TrtConfig), errors, the logger that collects messages, and the GC pause around builder calls."""

from __future__ import annotations

import functools
import gc

import importlib
from dataclasses import asdict, dataclass
from typing import Any, Optional


PLAN_FILE = "unet.plan"
TIMING_CACHE_FILE = "timing.cache"
FLAVORS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}


class TensorRTUnavailable(RuntimeError):
    """The requested TensorRT library cannot be imported."""


class TensorRTBuildError(RuntimeError):
    """Parsing or building failed; the message carries the parser/builder errors."""

    def __init__(self, message: str, errors: list[str]):
        super().__init__(message)
        self.errors = errors


def import_tensorrt(flavor: str = "tensorrt"):
    """Import `tensorrt` or `tensorrt_rtx_bindings`; TensorRTUnavailable with the reason if missing."""
    mod = FLAVORS.get(flavor)
    if mod is None:
        raise ValueError(f"unknown TensorRT flavor {flavor!r} ({', '.join(FLAVORS)})")
    try:
        return importlib.import_module(mod)
    except Exception as exc:  # ImportError, or a broken stub wheel raising at import
        raise TensorRTUnavailable(f"{mod} is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def tensorrt_available(flavor: str = "tensorrt") -> bool:
    try:
        import_tensorrt(flavor)
        return True
    except TensorRTUnavailable:
        return False


@dataclass
class TrtConfig:
    """Build options. Batch profile applies to every input whose first dim is dynamic."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    fp16: bool = True                  # non-quantized layers may run in FP16 (weakly typed networks)
    strongly_typed: bool = False       # types follow the ONNX graph exactly (TensorRT >= 9)
    workspace_gib: float = 4.0
    builder_optimization_level: int = 3
    compute_capability: Optional[str] = None  # TensorRT-RTX AOT target, e.g. "SM89"; None = current GPU
    timing_cache: Optional[str] = None        # path; default <out>/timing.cache (full TensorRT only)
    detailed_profiling: bool = True           # needed for per-layer precision in the inspector

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _make_logger(trt, min_severity: str = "INFO"):
    order = ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"]
    keep = order[: order.index(min_severity) + 1]

    class _Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, msg):
            sev = str(severity).split(".")[-1]
            if sev in keep:
                self.lines.append(f"[{sev}] {msg}")
            if sev in ("ERROR", "INTERNAL_ERROR"):
                self.errors.append(msg)

    return _Log()


def _dtype_name(dt) -> str:
    return str(dt).split(".")[-1].split(":")[0].strip("<> ").lower()


def _gc_paused(fn):
    """Run fn with Python's cyclic GC paused (after one collection). TensorRT calls our Python logger while holding
    its builder mutex; a GC pass triggered inside that callback can free an older IBuilder, whose destructor
    takes the same mutex: a deadlock (seen with TensorRT-RTX 1.7 in a long test session)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.collect()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper
