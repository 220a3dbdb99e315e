"""ONNX Runtime sessions: the engine options (OrtConfig), providers, session options and the kernel summary that
says which kernels actually run."""

from __future__ import annotations

import collections
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import onnx


ENGINE_FILE = "model.onnx"
LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger",
                "QGemm", "QLinearAdd", "QLinearMul", "NhwcQLinearConv", "DynamicQuantizeMatMul",
                "MatMulNBits", "QAttention", "QLinearSoftmax", "QLinearConcat", "QLinearSigmoid",
                "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu", "QLinearReduceMean")
QUANT_COMPUTE = ("Conv", "MatMul", "Gemm")


@dataclass
class OrtConfig:
    """How the ONNX Runtime engine is built and run."""

    mode: str = "int8"               # "int8" (u8 activations + requantized Conv outputs) | "qdq" (graph as exported)
    optimization_level: str = "extended"  # extended = QDQ fusion into QLinearConv/MatMulIntegerToFloat
    intra_op_threads: int = 0         # 0 = ORT default (physical cores)
    inter_op_threads: int = 1
    provider: str = "auto"           # auto | cpu | cuda
    calib_samples: int = 16          # random N(0,1) samples for the Conv-output requant scales (mode int8)
    calib_seed: int = 0
    requant_max_ratio: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6)  # clip ratios searched by MSE
    u8_weights: str = "auto"         # auto (x86 without VNNI) | yes | no: int8 weights as uint8 zp 128 (mode int8)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ort():
    import onnxruntime as ort

    return ort


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def pick_providers(provider: str = "auto") -> list[str]:
    av = available_providers()
    if provider == "cuda":
        if "CUDAExecutionProvider" not in av:
            raise RuntimeError("CUDA execution provider not available (install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "auto" and "CUDAExecutionProvider" in av:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(cfg: OrtConfig, optimized_path: Optional[str] = None, profile: bool = False):
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[cfg.optimization_level])
    if cfg.intra_op_threads:
        so.intra_op_num_threads = int(cfg.intra_op_threads)
    so.inter_op_num_threads = max(1, int(cfg.inter_op_threads))
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if profile:
        so.enable_profiling = True
    return so


def make_session(model: str | Path | onnx.ModelProto | bytes, cfg: Optional[OrtConfig] = None,
                 optimized_path: Optional[str] = None):
    cfg = cfg or OrtConfig()
    ort = _ort()
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else (
        model if isinstance(model, bytes) else str(model))
    return ort.InferenceSession(src, session_options(cfg, optimized_path), providers=pick_providers(cfg.provider))


def kernel_summary(model: str | Path | onnx.ModelProto | bytes, cfg: Optional[OrtConfig] = None) -> dict[str, Any]:
    """Op types that actually run after ORT's graph optimisations (from the saved optimised model)."""
    cfg = cfg or OrtConfig()
    with tempfile.TemporaryDirectory() as td:
        opt = os.path.join(td, "optimized.onnx")
        c = OrtConfig(**{**cfg.to_dict(), "provider": "cpu"})
        if c.optimization_level == "all":  # NCHWc layouts are saved too; 'extended' shows the same int8 fusions
            c.optimization_level = "extended"
        make_session(model, c, optimized_path=opt)
        m = onnx.load(opt, load_external_data=False)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    int8 = {k: v for k, v in ops.items() if k in INT8_KERNELS}
    float_compute = {k: v for k, v in ops.items() if k in QUANT_COMPUTE or k.startswith("FusedConv")
                     or k in ("FusedMatMul", "FusedGemm")}
    return {"op_counts": dict(sorted(ops.items())), "int8_kernels": int8, "float_compute": float_compute,
            "n_int8_kernels": int(sum(int8.values())), "n_float_compute": int(sum(float_compute.values()))}
