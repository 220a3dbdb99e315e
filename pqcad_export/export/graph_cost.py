"""Graph clean-up after the TorchScript export that makes the QDQ graph cheap to run, without changing its math.

* Split convolutions slice the skip concatenation back into its halves: the slices are folded away.
* GroupNorm stays the exporter's InstanceNormalization chain: one GroupNormalization-21 node ran slower on
  OpenVINO 2026.4's CPU plugin (issue 22: it decomposes it into the same MVN plus an extra Subtract chain).
  But a GroupNorm with one channel per group (C == groups, the UNet's widest-resolution blocks) is an instance
  norm: it becomes one InstanceNormalization on the 4D tensor with the affine folded in. The exporter's Reshape to
  [B, G, -1] forced OpenVINO to reorder the channels-last tensor to planar and back around the MVN (the largest
  reorders of the INT8 graph); without it the MVN runs channels-last with SiLU and the next QuantizeLinear fused.
  QDQ export only: the FP reference keeps the exporter's form (faster there on a dynamic-batch OpenVINO compile).
* Dead initializers (tensors no node reads, e.g. left behind by a rewrite) are dropped: engines warn about each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Shapes of the graph's tensors where ONNX shape inference knows them (None for a dimension it cannot fix)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    return {vi.name: [int(d.dim_value) if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
            if vi.type.tensor_type.HasField("shape")}


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    return {k: len(v) for k, v in _shapes(model).items()}


def _channels(model: onnx.ModelProto) -> dict[str, int]:
    """Static axis-1 sizes of the graph's tensors."""
    return {k: v[1] for k, v in _shapes(model).items() if len(v) >= 2 and v[1] is not None}


def fold_concat_slices(model: onnx.ModelProto) -> int:
    """Slice(Concat(a, b, ...; axis 1)) that takes exactly one input of the concatenation -> that input.

    The split convolutions of a skip connection (two Convs + Add, Q-Diffusion's split quantization) slice the
    concatenated tensor back into its two halves; OpenVINO ran those slices as reference (non-JIT) kernels plus
    layout reorders. Same values, fewer nodes. In place; returns how many slices it removed."""
    consts = _consts(model)
    prod = {o: n for n in model.graph.node for o in n.output}
    chans = _channels(model)
    outs = {o.name for o in model.graph.output}
    rename, drop = {}, set()
    for n in model.graph.node:
        if n.op_type != "Slice" or len(n.input) < 4 or n.output[0] in outs:
            continue
        cat = prod.get(n.input[0])
        if cat is None or cat.op_type != "Concat" or _attr(cat, "axis") != 1:
            continue
        starts, ends, axes = (consts.get(i) for i in n.input[1:4])
        steps = consts.get(n.input[4]) if len(n.input) > 4 else np.array([1])
        if any(v is None for v in (starts, ends, axes, steps)) or axes.size != 1 or int(axes.reshape(-1)[0]) != 1 \
                or int(steps.reshape(-1)[0]) != 1:
            continue
        sizes = [chans.get(i) for i in cat.input]
        if any(c is None for c in sizes):
            continue
        lo, total = 0, sum(sizes)
        s0, e0 = int(starts.reshape(-1)[0]), min(int(ends.reshape(-1)[0]), total)
        for inp, c in zip(cat.input, sizes):
            if (s0, e0) == (lo, lo + c):
                rename[n.output[0]] = inp
                drop.add(id(n))
                break
            lo += c
    if not rename:
        return 0
    keep = [n for n in model.graph.node if id(n) not in drop]
    for n in keep:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    remove_dead_initializers(model)
    return len(rename)


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def instance_norm_channel_groups(model: onnx.ModelProto) -> int:
    """GroupNorm with one channel per group -> InstanceNormalization(x, gamma, beta) on x itself.

    Matches the TorchScript exporter's GroupNorm: Reshape(x, [0, G, -1]) -> InstanceNormalization(ones, zeros)
    -> Reshape(., Shape(x)) -> Mul(gamma [C,1..]) -> Add(beta [C,1..]) with C == G, each link read only by the
    next. Same math (per-channel mean/variance over the spatial axes, then per-channel affine); standard ONNX
    (opset 6+) that ONNX Runtime, TensorRT and OpenVINO run natively. In place; returns how many it rewrote."""
    consts = _consts(model)
    prod = {o: n for n in model.graph.node for o in n.output}
    cons = _consumers(model)
    outs = {o.name for o in model.graph.output}
    ranks = _ranks(model)

    def only(t: str, op: str):
        c = cons.get(t, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and t not in outs else None

    drop, extra, count = set(), [], 0
    for n in model.graph.node:
        if n.op_type != "InstanceNormalization" or len(n.input) != 3:
            continue
        r0 = prod.get(n.input[0])
        shape, scale, bias = (consts.get(i) for i in (r0.input[1] if r0 else "", n.input[1], n.input[2]))
        if r0 is None or r0.op_type != "Reshape" or shape is None or scale is None or bias is None:
            continue
        r1 = only(n.output[0], "Reshape")
        mul = only(r1.output[0], "Mul") if r1 is not None else None
        add = only(mul.output[0], "Add") if mul is not None else None
        if add is None:
            continue
        gamma, beta = consts.get(mul.input[1]), consts.get(add.input[1])
        groups = int(scale.size)
        if gamma is None or beta is None or shape.size != 3 or list(shape.reshape(-1)[[0, 2]]) != [0, -1] \
                or int(shape.reshape(-1)[1]) != groups or not (np.all(scale == 1) and np.all(bias == 0)):
            continue
        src = prod.get(r1.input[1])  # back to x's own shape
        if src is None or src.op_type != "Shape" or src.input[0] != r0.input[0]:
            continue
        rank = gamma.ndim + 1
        if gamma.size != groups or beta.size != groups or gamma.shape[1:] != (1,) * (rank - 2) \
                or beta.shape != gamma.shape or ranks.get(r0.input[0], rank) != rank:
            continue
        g_name, b_name = n.name + "/gamma", n.name + "/beta"
        extra += [numpy_helper.from_array(gamma.reshape(-1).astype(np.float32), g_name),
                  numpy_helper.from_array(beta.reshape(-1).astype(np.float32), b_name)]
        del n.input[:]
        n.input.extend([r0.input[0], g_name, b_name])
        n.output[0] = add.output[0]
        drop |= {id(r1), id(mul), id(add)}
        if len(cons.get(r0.output[0], [])) == 1:
            drop.add(id(r0))
        count += 1
    if not count:
        return 0
    model.graph.initializer.extend(extra)
    keep = [n for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    remove_dead_nodes(model)
    remove_dead_initializers(model)
    return count


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes none of whose outputs is read (e.g. a Shape left behind by a rewrite). In place; the count."""
    removed = 0
    while True:
        used = _used_names(model)
        keep = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(keep) == len(model.graph.node):
            return removed
        removed += len(model.graph.node) - len(keep)
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _used_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name a node (in any subgraph) reads, plus the graph outputs."""
    used = {o.name for o in model.graph.output}

    def walk(g):
        for n in g.node:
            used.update(n.input)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        walk(sg)

    walk(model.graph)
    return used


def dead_initializers(model: onnx.ModelProto) -> list[str]:
    """Names of initializers that no node (in any subgraph) reads and that are no graph output."""
    used = _used_names(model)
    return [t.name for t in model.graph.initializer if t.name not in used]


def remove_dead_initializers(model: onnx.ModelProto) -> int:
    """Drop unused initializers (and their graph-input entries, for old IRs). In place; returns the count."""
    dead = set(dead_initializers(model))
    if not dead:
        return 0
    keep = [t for t in model.graph.initializer if t.name not in dead]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    ins = [i for i in model.graph.input if i.name not in dead]
    del model.graph.input[:]
    model.graph.input.extend(ins)
    return len(dead)
