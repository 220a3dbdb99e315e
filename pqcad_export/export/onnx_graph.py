"""Post-processing of the exported ONNX graph: layer -> node expectations, the weight map, INT4 re-packing and
constant folding into named initializers."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import PqcadError


INT4_BLOCK_SIZES = (128, 64, 32, 16)


def _scope(name: str) -> str:
    """TorchScript exporter scopes: '/unet/down_blocks.0/resnets.0/conv1/Conv' (compared with '/' -> '.')."""
    return ".unet." + name + "."


def _expectations(model: onnx.ModelProto, layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Map each quantized layer to the ONNX compute node(s) the exporter wrote for it (by module scope)."""
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    exp = []
    for L in layers:
        sc = _scope(L["name"])
        mine = [n for n in nodes if n.name.replace("/", ".").startswith(sc)
                and "." not in n.name.replace("/", ".")[len(sc):]]
        if L["kind"] == "attn":
            mm = [n for n in mine if n.op_type == "MatMul"]
            if len(mm) != 2:
                raise PqcadError(f"exporter: expected 2 attention MatMuls in {L['name']}, found {len(mm)}")
            acts = L["act_quant"]  # q, k, v, p
            exp.append({"node": mm[0].name, "op": "MatMul", "layer": L["name"] + ".qk",
                        "act": [i for i, on in zip((0, 1), acts[:2]) if on], "weight": None})
            exp.append({"node": mm[1].name, "op": "MatMul", "layer": L["name"] + ".pv",
                        "act": [i for i, on in zip((0, 1), (acts[3], acts[2])) if on], "weight": None})
            continue
        op = "Conv" if L["kind"] in ("conv", "split") else "MatMul"
        mine = [n for n in mine if n.op_type == op]
        want = 2 if L["kind"] == "split" else 1
        if len(mine) != want:
            raise PqcadError(f"exporter: expected {want} {op} node(s) for {L['name']}, found {len(mine)}")
        wkind = "int4" if L["kind"] == "linear_int4" else "int8"
        for k, n in enumerate(mine):
            act_on = L["act_quant"][k] if L["kind"] == "split" else L["act_quant"][0]
            exp.append({"node": n.name, "op": op, "layer": L["name"] + (f".part{k}" if want == 2 else ""),
                        "act": [0] if act_on else [], "weight": wkind})
            if not act_on:  # FP input (mixed-precision plan, conv_in/conv_out, INT4 weight-only): no Q/DQ there
                exp[-1]["float_act"] = [0]
    return exp


def _weight_map(model: onnx.ModelProto, exp: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    prod = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for e in exp:
        if not e.get("weight"):
            continue
        n = next(x for x in model.graph.node if x.name == e["node"])
        dq = prod.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        out[e["layer"]] = {"initializer": dq.input[0], "scale": dq.input[1], "node": n.name,
                           "layout": "transposed" if e["op"] == "MatMul" else "as-is"}
    return out


def _to_int4(model: onnx.ModelProto, exp: list[dict[str, Any]], block: int) -> int:
    """Rewrite INT8 weight DQs of int4 MatMuls as INT4 blocked DQ (blocked along K = axis 0 of B[K, N])."""
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for e in exp:
        if e.get("weight") != "int4":
            continue
        n = next(x for x in model.graph.node if x.name == e["node"])
        dq = prod[n.input[1]]
        w = numpy_helper.to_array(inits[dq.input[0]])
        s = numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else None
        if s is None:
            raise PqcadError(f"exporter: scale of {dq.name} is not an initializer")
        K, N = w.shape
        if w.min() < -8 or w.max() > 7:
            raise PqcadError(f"{e['layer']}: weights outside the 4-bit grid cannot be packed as INT4")
        bs = block or next((b for b in INT4_BLOCK_SIZES if K % b == 0), K)
        if K % bs:
            raise PqcadError(f"{e['layer']}: INT4 block size {bs} does not divide {K} input features")
        blocked = np.broadcast_to(s.reshape(1, N), (K // bs, N)).astype(np.float32).copy()
        wname, sname, zname = dq.input[0] + "_int4", dq.input[1] + "_blocked", dq.input[0] + "_int4_zp"
        model.graph.initializer.extend([
            onnx.helper.make_tensor(wname, onnx.TensorProto.INT4, [K, N], w.astype(np.int8).ravel().tolist()),
            numpy_helper.from_array(blocked, sname),
            onnx.helper.make_tensor(zname, onnx.TensorProto.INT4, [K // bs, N], [0] * (K // bs * N))])
        del dq.input[:]
        dq.input.extend([wname, sname, zname])
        del dq.attribute[:]
        dq.attribute.extend([onnx.helper.make_attribute("axis", 0), onnx.helper.make_attribute("block_size", bs)])
        count += 1
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return count


def _fold_constant_nodes(model: onnx.ModelProto) -> None:
    """Constant nodes and Identity-of-initializer (the exporter's dedup of equal buffers) -> initializers, so
    every scale and zero point is a named, inspectable initializer."""
    keep = []
    inits = {t.name: t for t in model.graph.initializer}
    names = set(inits)
    for n in model.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in names:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            model.graph.initializer.append(t)
            inits[t.name] = t
            names.add(t.name)
            continue
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value" \
                and n.output[0] not in names:
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            model.graph.initializer.append(t)
            inits[t.name] = t
            names.add(t.name)
        else:
            keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)
