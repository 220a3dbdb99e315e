"""Graph clean-up after the TorchScript export that makes the QDQ graph cheap to run, without changing its math.

* Split convolutions slice the skip concatenation back into its halves: the slices are folded away.
* GroupNorm stays the exporter's InstanceNormalization chain: one GroupNormalization-21 node ran slower on
  OpenVINO 2026.4's CPU plugin (issue 22: it decomposes it into the same MVN plus an extra Subtract chain).
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


def _channels(model: onnx.ModelProto) -> dict[str, int]:
    """Static axis-1 sizes of the graph's tensors (ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_value"):
            out[vi.name] = int(dims[1].dim_value)
    return out


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


def dead_initializers(model: onnx.ModelProto) -> list[str]:
    """Names of initializers that no node (in any subgraph) reads and that are no graph output."""
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
