"""`lint`: check a QDQ ONNX graph against the rules TensorRT's explicit quantization imposes.

TensorRT (and TensorRT-RTX) reject or silently de-quantize graphs that break these rules, and the failure shows up
late (at engine build on the user's GPU) or never (a layer quietly runs in FP16). Checking them on the ONNX gives
one readable report in CI. Expectations about which layers must be quantized come from metadata_props written by
the exporter (`pqcad.expect`), so "the exporter forgot a Q/DQ" is caught as well.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import PqcadError
from .lint_render import render_report  # noqa: F401  (re-exported: the lint / export commands)

EXPECT_KEY = "pqcad.expect"          # JSON: [{"node": name, "op": "Conv", "act": [0], "weight": "int8"|"int4"|null,
#                                              "float_act": [0] (inputs that must stay FP)}]
PLAN_META = "mixed_precision"        # written as metadata "pqcad.meta.mixed_precision" (quantize/plan.py)
STANDARD_DOMAINS = ("", "ai.onnx")
MIN_OPSET = 17
MIN_OPSET_INT4 = 21
COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Violation:
    rule: str
    node: str
    message: str
    severity: str = "error"   # "error" fails lint; "warning" is reported only


@dataclass
class LintReport:
    path: str
    opset: int
    violations: list[Violation] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "error"]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def rules_failed(self) -> set[str]:
        return {v.rule for v in self.errors}

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "opset": self.opset, "n_errors": len(self.errors),
                "n_warnings": len(self.warnings), "stats": self.stats,
                "violations": [asdict(v) for v in self.violations]}


class _Graph:
    """Index of one ONNX graph: producers, consumers, constants (initializers and Constant nodes)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in g.node:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))
        self.const: dict[str, np.ndarray] = {}
        self.const_dtype: dict[str, int] = {}
        for t in g.initializer:
            self.const_dtype[t.name] = t.data_type
            try:
                self.const[t.name] = numpy_helper.to_array(t)
            except Exception:  # external data not loaded: dtype is enough for most rules
                pass
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.const_dtype[n.output[0]] = a.t.data_type
                        self.const[n.output[0]] = numpy_helper.to_array(a.t)
        for n in g.node:  # Identity of a constant is a constant (TensorRT folds it)
            if n.op_type == "Identity" and n.input and n.input[0] in self.const_dtype:
                self.const_dtype[n.output[0]] = self.const_dtype[n.input[0]]
                if n.input[0] in self.const:
                    self.const[n.output[0]] = self.const[n.input[0]]
        self.inputs = {i.name for i in g.input}

    def is_const(self, name: str) -> bool:
        return name in self.const_dtype

    def dtype(self, name: str) -> Optional[int]:
        return self.const_dtype.get(name)


def _name(n: onnx.NodeProto) -> str:
    return n.name or f"{n.op_type}({n.output[0] if n.output else '?'})"


def _attr(n: onnx.NodeProto, key: str, default: Any = None) -> Any:
    for a in n.attribute:
        if a.name == key:
            return onnx.helper.get_attribute_value(a)
    return default


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in STANDARD_DOMAINS:
            return int(o.version)
    return 0


INT4_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
INT8_TYPES = {onnx.TensorProto.INT8}


def read_onnx_header(path: str | Path, flag: str = "") -> onnx.ModelProto:
    """The ONNX file's graph without external weights; UsageError for a missing, empty or non-ONNX file (an empty
    file parses as an empty ModelProto, which is not a model with "opset 0")."""
    from ..errors import UsageError

    p, who = Path(path), f"{flag} {path}".strip()
    if not p.is_file():
        raise PqcadError(f"no such ONNX file: {who}")
    if p.stat().st_size == 0:
        raise UsageError(f"unreadable ONNX file: {who} is empty")
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"unreadable ONNX file: {who} is not an ONNX model ({msg})") from None
    if not m.opset_import or not m.graph.node:
        raise UsageError(f"unreadable ONNX file: {who} holds no ONNX graph")
    return m


def lint_model(model: onnx.ModelProto | str | Path) -> LintReport:
    """Check every TensorRT QDQ rule; never raises for a bad graph (violations are returned)."""
    path = ""
    if not isinstance(model, onnx.ModelProto):
        path = str(model)
        read_onnx_header(model)
        try:
            model = onnx.load(str(model), load_external_data=True)
        except Exception as exc:
            raise PqcadError(f"not a readable ONNX model: {model} ({str(exc).splitlines()[0][:200]})") from None
    g = _Graph(model)
    opset = _default_opset(model)
    rep = LintReport(path=path, opset=opset)
    V = rep.violations

    def add(rule, node, msg, severity="error"):
        V.append(Violation(rule, node if isinstance(node, str) else _name(node), msg, severity))

    if opset < MIN_OPSET:
        add("opset", "<model>", f"default-domain opset {opset} < {MIN_OPSET}")
    for n in g.nodes:
        if n.domain not in STANDARD_DOMAINS:
            add("custom-domain", n, f"{n.op_type} is in custom domain '{n.domain}' (TensorRT parses only ai.onnx)")

    q_nodes = [n for n in g.nodes if n.op_type == "QuantizeLinear"]
    dq_nodes = [n for n in g.nodes if n.op_type == "DequantizeLinear"]
    n_int4 = 0
    for n in q_nodes + dq_nodes:
        # ---- scale: constant, positive, finite
        sc_name = n.input[1] if len(n.input) > 1 else ""
        sc = g.const.get(sc_name)
        if not g.is_const(sc_name):
            add("scale-constant", n, f"scale '{sc_name}' is not a constant (TensorRT needs build-time scales)")
        elif sc is not None:
            if not np.all(np.isfinite(sc)) or np.any(sc <= 0):
                add("scale-positive", n, f"scale '{sc_name}' has non-positive or non-finite values "
                                         f"(min {float(np.min(sc)):.3g})")
        # ---- zero point: constant zeros of a signed type
        zp_name = n.input[2] if len(n.input) > 2 else ""
        if zp_name:
            zp = g.const.get(zp_name)
            if not g.is_const(zp_name):
                add("zero-point", n, f"zero point '{zp_name}' is not a constant")
            elif zp is not None and np.any(zp.astype(np.int64) != 0):
                add("zero-point", n, f"non-zero zero point in '{zp_name}' (TensorRT supports symmetric only)")
            zdt = g.dtype(zp_name)
            if zdt is not None and zdt not in INT8_TYPES | {onnx.TensorProto.INT4}:
                add("quant-type", n, f"zero point type {onnx.TensorProto.DataType.Name(zdt)} "
                                     "(TensorRT needs INT8, or INT4 for weight-only)")
        elif n.op_type == "QuantizeLinear":
            add("quant-type", n, "QuantizeLinear without zero point produces UINT8 (TensorRT needs INT8)")
        # ---- DQ of a constant (weight): dtype rules
        if n.op_type == "DequantizeLinear":
            src = n.input[0]
            if g.is_const(src):
                dt = g.dtype(src)
                if dt in INT4_TYPES:
                    n_int4 += 1
                    _check_int4(g, n, add, opset)
                elif dt not in INT8_TYPES:
                    add("quant-type", n, f"weight '{src}' is {onnx.TensorProto.DataType.Name(dt)}; TensorRT "
                                         "needs INT8 (or INT4 weight-only)")
            if _attr(n, "block_size", 0) and g.dtype(src) not in INT4_TYPES:
                add("block-quant", n, "blocked DequantizeLinear is only legal for INT4 weights")

    # ---- activation Q/DQ: per-tensor; Q->DQ pairs share scale
    for n in q_nodes:
        sc = g.const.get(n.input[1]) if len(n.input) > 1 else None
        if sc is not None and sc.size != 1:
            add("activation-per-tensor", n, f"activation scale has {sc.size} values; TensorRT needs per-tensor")
        for c, _ in g.consumers.get(n.output[0], []):
            if c.op_type != "DequantizeLinear":
                add("qdq-pair", n, f"QuantizeLinear output feeds {c.op_type} '{_name(c)}', not a DequantizeLinear")
                continue
            s2 = g.const.get(c.input[1]) if len(c.input) > 1 else None
            if sc is not None and s2 is not None and (sc.shape != s2.shape or not np.allclose(sc, s2, rtol=0,
                                                                                               atol=0)):
                add("qdq-pair", c, "DequantizeLinear scale differs from its QuantizeLinear's (requantization)")

    # ---- weights per channel on the right axis
    n_qconv = n_qmm = 0
    for n in g.nodes:
        if n.op_type not in COMPUTE:
            continue
        ins = [g.producer.get(x) for x in n.input]
        quant_inputs = [i for i, p in enumerate(ins[:2]) if p is not None and p.op_type == "DequantizeLinear"]
        if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 and ins[1] is not None \
                and ins[1].op_type == "DequantizeLinear":
            dq = ins[1]
            if g.dtype(dq.input[0]) in INT4_TYPES:
                add("int4-conv", n, "INT4 weights feed a Conv; TensorRT has no INT4 convolution "
                                    "(store 4-bit grids as INT8 values)")
            _check_weight_axis(g, dq, n, 0 if n.op_type == "Conv" else 1, add)
            n_qconv += 1
        elif n.op_type in ("Gemm", "MatMul"):
            for i in quant_inputs:
                dq = ins[i]
                if not g.is_const(dq.input[0]) or g.dtype(dq.input[0]) in INT4_TYPES:
                    continue
                w = g.const.get(dq.input[0])
                if i == 1:
                    if n.op_type == "Gemm":
                        axis = 0 if _attr(n, "transB", 0) else 1
                    else:
                        rank = w.ndim if w is not None else 2
                        axis = rank - 1
                    _check_weight_axis(g, dq, n, axis, add)
            if quant_inputs:
                n_qmm += 1
        # INT4 weights together with INT8 activations (TensorRT: INT4 is weight-only)
        if n.op_type in ("Gemm", "MatMul") and len(ins) > 1 and ins[1] is not None and \
                ins[1].op_type == "DequantizeLinear" and g.dtype(ins[1].input[0]) in INT4_TYPES:
            if ins[0] is not None and ins[0].op_type == "DequantizeLinear":
                add("int4-weight-only", n, "INT4 weights combined with quantized (INT8) activations; TensorRT INT4 "
                                           "is weight-only: leave this input unquantized")
    if n_int4 and opset < MIN_OPSET_INT4:
        add("opset", "<model>", f"INT4 DequantizeLinear needs opset >= {MIN_OPSET_INT4}, model has {opset}")

    # ---- exporter expectations
    meta = {p.key: p.value for p in model.metadata_props}
    expected = []
    if EXPECT_KEY in meta:
        try:
            expected = json.loads(meta[EXPECT_KEY])
        except json.JSONDecodeError:
            add("metadata", "<model>", f"metadata '{EXPECT_KEY}' is not valid JSON")
    by_name = {n.name: n for n in g.nodes if n.name}
    n_expect_ok = 0
    for e in expected:
        n = by_name.get(e.get("node", ""))
        if n is None:
            add("expected-quantized", e.get("node", "?"), f"expected {e.get('op')} node is missing from the graph")
            continue
        bad = False
        for i in e.get("act", []):
            p = g.producer.get(n.input[i]) if i < len(n.input) else None
            pp = g.producer.get(p.input[0]) if p is not None and p.op_type == "DequantizeLinear" else None
            if pp is None or pp.op_type != "QuantizeLinear":
                add("expected-quantized", n, f"input {i} of {n.op_type} should be quantized (Q->DQ) but is not")
                bad = True
        wk = e.get("weight")
        if wk:
            p = g.producer.get(n.input[1]) if len(n.input) > 1 else None
            if p is None or p.op_type != "DequantizeLinear" or not g.is_const(p.input[0]):
                add("expected-quantized", n, f"weight of {n.op_type} should be a constant {wk} DequantizeLinear")
                bad = True
            else:
                want = INT4_TYPES if wk == "int4" else INT8_TYPES
                if g.dtype(p.input[0]) not in want:
                    add("expected-quantized", n, f"weight of {n.op_type} should be {wk}")
                    bad = True
        for i in e.get("float_act", []):
            p = g.producer.get(n.input[i]) if i < len(n.input) else None
            pp = g.producer.get(p.input[0]) if p is not None and p.op_type == "DequantizeLinear" else None
            if pp is not None and pp.op_type == "QuantizeLinear":
                add("expected-float", n, f"input {i} of {n.op_type} is planned floating point but is quantized")
                bad = True
        n_expect_ok += not bad
    float_layers = sorted({e.get("layer", e.get("node", "?")).rsplit(".part", 1)[0] for e in expected
                           if e.get("float_act")})
    _check_plan(meta, expected, add)
    # compute nodes with exactly one of two inputs quantized run unquantized in TensorRT: warn
    for n in g.nodes:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) >= 2:
            ins = [g.producer.get(x) for x in n.input[:2]]
            isq = [p is not None and p.op_type == "DequantizeLinear" for p in ins]
            w_int4 = isq[1] and g.dtype(ins[1].input[0]) in INT4_TYPES
            if isq[0] != isq[1] and not w_int4:
                add("partial-quant", n, f"only input {isq.index(True)} of {n.op_type} is quantized; TensorRT runs "
                                        "it in floating point", "warning")
    rep.stats = {"quantize_linear": len(q_nodes), "dequantize_linear": len(dq_nodes),
                 "quantized_conv": n_qconv, "quantized_matmul_gemm": n_qmm, "int4_weights": n_int4,
                 "expected": len(expected), "expected_ok": n_expect_ok, "nodes": len(g.nodes),
                 "float_input_layers": float_layers}
    return rep


def _check_plan(meta: dict[str, str], expected: list[dict[str, Any]], add) -> None:
    """The graph's per-layer expectations agree with the mixed-precision plan recorded at export."""
    raw = meta.get(f"pqcad.meta.{PLAN_META}")
    if not raw:
        return
    try:
        plan = json.loads(raw)
    except json.JSONDecodeError:
        add("metadata", "<model>", f"metadata 'pqcad.meta.{PLAN_META}' is not valid JSON")
        return
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for e in expected:
        by_layer.setdefault(e.get("layer", "").rsplit(".part", 1)[0], []).append(e)
    for name in plan.get("fp_act_layers", []):
        es = by_layer.get(name)
        if not es:
            add("plan", name, "planned FP-input layer has no node in the export")
        elif any(e.get("act") or not e.get("float_act") for e in es):
            add("plan", name, "planned FP-input layer is exported with a quantized input")


def _check_weight_axis(g: _Graph, dq: onnx.NodeProto, consumer: onnx.NodeProto, want_axis: int, add) -> None:
    sc = g.const.get(dq.input[1]) if len(dq.input) > 1 else None
    w = g.const.get(dq.input[0])
    if sc is None or sc.size == 1:
        return  # per-tensor weights are legal
    axis = int(_attr(dq, "axis", 1))
    rank = w.ndim if w is not None else None
    if rank is not None and axis < 0:
        axis += rank
    if axis != want_axis:
        add("weight-axis", dq, f"per-channel weight scale on axis {axis} for {consumer.op_type} "
                               f"'{_name(consumer)}'; TensorRT needs axis {want_axis} (output channels)")
    elif w is not None and sc.size != w.shape[axis]:
        add("weight-axis", dq, f"{sc.size} scales for {w.shape[axis]} output channels")


def _check_int4(g: _Graph, dq: onnx.NodeProto, add, opset: int) -> None:
    users = g.consumers.get(dq.output[0], [])
    for c, i in users:
        if c.op_type not in ("MatMul", "Gemm"):
            if c.op_type in ("Conv", "ConvTranspose"):
                continue  # reported as int4-conv
            add("int4-placement", dq, f"INT4 DequantizeLinear feeds {c.op_type}; TensorRT allows INT4 only as "
                                      "MatMul/Gemm weights")
        elif i != 1:
            add("int4-placement", dq, f"INT4 DequantizeLinear is input {i} of {c.op_type}; must be the weight (B)")
    w = g.const.get(dq.input[0])
    rank = w.ndim if w is not None else 2
    bs = int(_attr(dq, "block_size", 0))
    axis = int(_attr(dq, "axis", 1))
    if axis < 0:
        axis += rank
    sc = g.const.get(dq.input[1]) if len(dq.input) > 1 else None
    if bs:
        if axis not in (rank - 1, rank - 2):
            add("int4-block-axis", dq, f"INT4 block axis {axis} of a rank-{rank} weight; TensorRT needs the last "
                                       "or second-to-last axis")
        if w is not None and w.shape[axis] % bs:
            add("int4-block-axis", dq, f"block size {bs} does not divide axis {axis} of length {w.shape[axis]}")
    elif sc is not None and sc.size != 1:
        add("int4-block-axis", dq, "INT4 weights must be blocked (block_size) or per-tensor in TensorRT")
