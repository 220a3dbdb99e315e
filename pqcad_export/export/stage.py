"""The export stage as the build pipeline runs it: quantized dir -> unet.onnx + lint.json + parity.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import PqcadError
from .lint import PLAN_META, lint_model
from .onnx import ExportConfig, export_unet
from .parity import ParityConfig, check_parity

ONNX_NAME = "unet.onnx"
LINT_NAME = "lint.json"
PARITY_NAME = "parity.json"


@dataclass
class StageResult:
    onnx: Path
    lint: dict[str, Any]
    parity: Optional[dict[str, Any]]
    export: dict[str, Any]


def export_quantized(quantized_dir: str | Path, out_onnx: str | Path, cfg: Optional[ExportConfig] = None,
                     parity: bool = True, parity_cfg: Optional[ParityConfig] = None,
                     fail_on_lint: bool = True) -> StageResult:
    """Load a saved quantized model, export QDQ ONNX, lint it and check parity (reports next to the ONNX)."""
    from engines.manifest import atomic_write_text

    from ..quantize.saved import load_quantized

    q = load_quantized(quantized_dir)
    out_onnx = Path(out_onnx)
    meta = {"bits": q.bits.name, "method": q.method, "steps": q.steps,
            "fingerprint": q.meta.get("fingerprint", ""), "source": str(Path(quantized_dir).resolve()),
            "source_fingerprint": q.meta.get("source_fingerprint") or ""}
    mp = q.meta.get("mixed_precision")
    if mp:  # the plan, for `lint` to check the graph against (per-layer table left out: quant.json has it)
        meta[PLAN_META] = {k: v for k, v in mp.items() if k != "layers"}
    res = export_unet(q.unet, out_onnx, cfg, meta=meta)
    rep = lint_model(out_onnx)
    atomic_write_text(out_onnx.parent / LINT_NAME, json.dumps(rep.to_dict(), indent=2))
    par = None
    if parity:
        par = check_parity(out_onnx, q, parity_cfg, out_json=out_onnx.parent / PARITY_NAME).to_dict()
    if fail_on_lint and not rep.ok:
        v = rep.errors[0]
        raise PqcadError(f"exported ONNX fails the TensorRT rule check ({len(rep.errors)} violations; first: "
                         f"{v.rule} at {v.node}: {v.message})")
    info = {"path": str(out_onnx), "opset": res.opset, "int8_weights": res.n_int8_weights,
            "int4_weights": res.n_int4_weights, "activation_qdq": res.n_act_qdq, "external_data": res.external_data,
            "bits": q.bits.name, "labels": _labels(q, res)}
    return StageResult(onnx=out_onnx, lint=rep.to_dict(), parity=par, export=info)


def _labels(q, res) -> list[str]:
    """What actually runs, in the report's words (docs/architecture.md, 'Quantization conventions')."""
    wb = sorted({m.weight_bits for _, m in q.quant_layers()})
    out = []
    if 4 in wb:
        out.append("conv: int8 kernels, 4-bit grid (INT4 convolution does not exist in TensorRT)")
    if res.n_int4_weights:
        out.append(f"{res.n_int4_weights} linear(s): INT4 weight-only MatMul (blocked), activations FP")
    out.append(f"{res.n_int8_weights} layer(s) with INT8 weight initializers")
    return out
