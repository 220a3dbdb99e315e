"""The CPU INT8 copy of a QDQ graph for ONNX Runtime (see onnxruntime.py for why): uint8 zp128 activations,
requantized Conv outputs calibrated on the QDQ graph, uint8 weights on x86 CPUs without VNNI."""

from __future__ import annotations

import collections
import functools
import json
from typing import Any, Optional

import numpy as np
import onnx

from .base import cpu_info
from .ort_session import OrtConfig, make_session


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def quantized_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv nodes whose data input comes from an activation DQ and whose weight comes from a DQ."""
    prod = {o: n for n in model.graph.node for o in n.output}
    res = []
    for n in model.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2:
            continue
        a, w = prod.get(n.input[0]), prod.get(n.input[1])
        if a is not None and w is not None and a.op_type == "DequantizeLinear" and w.op_type == "DequantizeLinear":
            res.append(n)
    return res


def _u8_activations(model: onnx.ModelProto) -> int:
    """Symmetric int8 activation Q/DQ -> uint8 with zero point 128 (same math, VNNI-friendly). In place."""
    from onnx import numpy_helper

    consts = _constants(model)
    inits = {i.name for i in model.graph.initializer}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    zp_name = "pqcad_cpu_u8_zp128"
    if zp_name not in inits:
        model.graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zp_name))
    changed = 0
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3:
            continue
        zp, sc = consts.get(n.input[2]), consts.get(n.input[1])
        if zp is None or sc is None or zp.dtype != np.int8 or zp.size != 1 or int(zp.reshape(-1)[0]) != 0:
            continue
        dqs = consumers[n.output[0]]
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        # B operands of MatMul stay int8: MLAS runs u8 x s8 on VNNI, u8 x u8 on a slower path
        if any(c.op_type in ("MatMul", "Gemm") and i == 1 for d in dqs for c, i in _consumers_at(consumers, d)):
            continue
        n.input[2] = zp_name
        for d in dqs:
            while len(d.input) < 3:
                d.input.append("")
            d.input[2] = zp_name
        changed += 1
    return changed


@functools.lru_cache(maxsize=1)
def x86_without_vnni() -> bool:
    """True on an x86 CPU whose flags (Linux /proc/cpuinfo) show no VNNI / AMX-INT8 dot-product instructions."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = cpu_info()[1]
    if not flags:
        return False  # unknown: keep the faster u8 x s8 kernels
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def _u8_weights(model: onnx.ModelProto) -> int:
    """int8 weight initializers of DequantizeLinear with zero point 0 -> uint8 (w + 128) with zero point 128: the
    same values, but MLAS then runs u8 x u8 kernels, which do not saturate on AVX2. In place; returns the count."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    changed = 0
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3 or n.input[0] not in inits or n.input[2] not in inits:
            continue
        w, zp = numpy_helper.to_array(inits[n.input[0]]), numpy_helper.to_array(inits[n.input[2]])
        if w.dtype != np.int8 or zp.dtype != np.int8 or np.any(zp != 0):
            continue
        inits[n.input[0]].CopyFrom(numpy_helper.from_array((w.astype(np.int16) + 128).astype(np.uint8), n.input[0]))
        inits[n.input[2]].CopyFrom(numpy_helper.from_array(np.full(zp.shape, 128, np.uint8), n.input[2]))
        changed += 1
    return changed


def _consumers_at(consumers: dict, node: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]]:
    out = []
    for c in consumers.get(node.output[0], []):
        out.extend((c, i) for i, x in enumerate(c.input) if x == node.output[0])
    return out


def _fold_matmul_scale(model: onnx.ModelProto) -> int:
    """MatMul(DQ(a), DQ(b)) * c  ->  MatMul(DQ(a), DQ'(b)) with DQ' scale = s_b * c (attention's 1/sqrt(d)).

    Same math; lets ORT's MatMulIntegerToFloat apply the factor instead of a separate pass over the scores."""
    from onnx import numpy_helper

    consts = _constants(model)
    prod = {o: n for n in model.graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    drop, folded = set(), 0
    for mm in model.graph.node:
        if mm.op_type != "MatMul":
            continue
        a, b = prod.get(mm.input[0]), prod.get(mm.input[1])
        if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
            continue
        users = consumers[mm.output[0]]
        if len(users) != 1 or users[0].op_type != "Mul" or len(consumers[b.output[0]]) != 1:
            continue
        mul = users[0]
        other = mul.input[1] if mul.input[0] == mm.output[0] else mul.input[0]
        c = consts.get(other)
        sb = consts.get(b.input[1])
        if c is None or c.size != 1 or sb is None or sb.size != 1 or float(c) <= 0:
            continue
        name = f"{b.input[1]}_x_{other}"
        model.graph.initializer.append(numpy_helper.from_array(np.array(float(sb) * float(c), np.float32), name))
        b.input[1] = name
        mm.output[0] = mul.output[0]
        drop.add(id(mul))
        folded += 1
    keep = [n for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return folded


def _random_feeds(model: onnx.ModelProto, n: int, seed: int) -> dict[str, np.ndarray]:
    """Calibration feeds: N(0,1) samples (x_t of a VP diffusion is ~N(0,1) at every t), timesteps over [0, 999]."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        shape = [n if (i == 0 and d is None) else (d or 1) for i, d in enumerate(dims)]
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if vi.name == "timestep" or (len(shape) <= 1 and np.issubdtype(dt, np.number) and len(model.graph.input) > 1):
            feeds[vi.name] = np.linspace(0, 999, num=shape[0] if shape else 1).round().astype(dt).reshape(shape)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def _calibrate_outputs(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray],
                       ratios: tuple[float, ...]) -> dict[str, tuple[float, int]]:
    """Asymmetric uint8 (scale, zero_point) per tensor, clip range chosen by MSE over `ratios`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for nm in names:
        if nm not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None))
    sess = make_session(m, OrtConfig(mode="qdq", provider="cpu", optimization_level="basic"))
    outs = sess.run(names, feeds)
    res = {}
    for nm, y in zip(names, outs):
        y = y.astype(np.float32).ravel()
        lo, hi = float(min(y.min(), 0.0)), float(max(y.max(), 0.0))
        best = None
        for r in ratios:
            a, b = lo * r, hi * r
            s = max((b - a) / 255.0, 1e-12)
            zp = int(np.clip(round(-a / s), 0, 255))
            q = np.clip(np.round(y / s) + zp, 0, 255)
            err = float(np.mean(((q - zp) * s - y) ** 2))
            if best is None or err < best[0]:
                best = (err, s, zp)
        res[nm] = (best[1], best[2])
    return res


def to_cpu_int8(model: onnx.ModelProto, cfg: Optional[OrtConfig] = None,
                feeds: Optional[dict[str, np.ndarray]] = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The CPU engine's copy of a QDQ graph (see module docstring). Returns (model, stats)."""
    from onnx import numpy_helper

    cfg = cfg or OrtConfig()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    convs = quantized_convs(m)
    stats: dict[str, Any] = {"u8_activation_qdq": 0, "requantized_conv_outputs": 0, "folded_matmul_scales": 0}
    if convs:
        feeds = feeds if feeds is not None else _random_feeds(m, cfg.calib_samples, cfg.calib_seed)
        qp = _calibrate_outputs(model, [c.output[0] for c in convs], feeds, cfg.requant_max_ratio)
        consumers = collections.defaultdict(list)
        for n in m.graph.node:
            for i, inp in enumerate(n.input):
                consumers[inp].append((n, i))
        graph_outputs = {o.name for o in m.graph.output}
        new_nodes = []
        for c in convs:
            y = c.output[0]
            if y in graph_outputs:
                continue  # keep the graph output float and exact
            s, zp = qp[y]
            tag = f"pqcad_rq_{len(new_nodes) // 2}"
            m.graph.initializer.extend([numpy_helper.from_array(np.array(s, np.float32), f"{tag}_s"),
                                        numpy_helper.from_array(np.array(zp, np.uint8), f"{tag}_zp")])
            q_out, dq_out = f"{tag}_q", f"{tag}_dq"
            for n, i in consumers[y]:
                n.input[i] = dq_out
            new_nodes += [onnx.helper.make_node("QuantizeLinear", [y, f"{tag}_s", f"{tag}_zp"], [q_out], name=f"{tag}_Q"),
                          onnx.helper.make_node("DequantizeLinear", [q_out, f"{tag}_s", f"{tag}_zp"], [dq_out],
                                                name=f"{tag}_DQ")]
        # insert each Q/DQ pair right after its Conv to keep the node list topologically sorted
        pairs = {new_nodes[2 * j].input[0]: new_nodes[2 * j: 2 * j + 2] for j in range(len(new_nodes) // 2)}
        ordered = []
        for n in m.graph.node:
            ordered.append(n)
            if n.op_type == "Conv" and n.output[0] in pairs:
                ordered.extend(pairs[n.output[0]])
        del m.graph.node[:]
        m.graph.node.extend(ordered)
        stats["requantized_conv_outputs"] = len(pairs)
    stats["u8_activation_qdq"] = _u8_activations(m)
    stats["folded_matmul_scales"] = _fold_matmul_scale(m)
    if cfg.u8_weights not in ("auto", "yes", "no"):
        raise ValueError(f"u8_weights must be auto, yes or no, got {cfg.u8_weights!r}")
    if cfg.u8_weights == "yes" or (cfg.u8_weights == "auto" and x86_without_vnni()):
        stats["u8_weights"] = _u8_weights(m)
    from pqcad_export.export.graph_cost import remove_dead_initializers

    remove_dead_initializers(m)  # the int8 zero points the u8 rewrite replaced (ORT warned about each)
    return m, stats


def layer_counts(model: onnx.ModelProto) -> dict[str, Any]:
    """Integer vs float-input layers of the exported graph (its `pqcad.expect` record; a split conv is one layer):
    a mixed-precision plan's FP layers carry no activation Q/DQ, so this copy runs them on float kernels."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        exp = json.loads(meta.get("pqcad.expect", "[]"))
    except json.JSONDecodeError:
        exp = []
    kinds: dict[str, bool] = {}
    for e in exp:
        if e.get("weight") is None:  # attention matmuls: not conv/linear layers
            continue
        name = e.get("layer", e.get("node", "?")).rsplit(".part", 1)[0]
        kinds[name] = kinds.get(name, False) or bool(e.get("act"))
    fl = sorted(n for n, q in kinds.items() if not q)
    return {"int_layers": len(kinds) - len(fl), "float_layers": len(fl), "float_layer_names": fl}
