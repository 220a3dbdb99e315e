"""GroupNorm with one channel per group is exported as one InstanceNormalization on the 4D tensor (no Reshape to
[B, G, -1] and back, the affine folded in) in the QDQ export; the rewrite is exact in float (ONNX Runtime vs
PyTorch on the FP graph), leaves the pattern alone where a group spans several channels, and OpenVINO then runs
that MVN channels-last, with no reorder in front of it (issue 22). The FP reference export keeps the exporter's
form (faster there on a dynamic-batch OpenVINO compile)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_unet
from export_helpers import make_quantized
from torch import nn

from engines.onnxruntime import OrtConfig, make_session
from pqcad_export.export.fp import export_fp_onnx
from pqcad_export.export.graph_cost import instance_norm_channel_groups
from pqcad_export.export.onnx import export_unet

GROUPS = 16  # tiny UNet widths (16, 32): the 16-channel norms have one channel per group, the 32-channel two


def _channel_group_norms(unet: nn.Module) -> int:
    return sum(1 for m in unet.modules() if isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels)


def _direct_instance_norms(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    """InstanceNormalization nodes that read a tensor no Reshape produced (the rewritten form)."""
    prod = {o: n for n in m.graph.node for o in n.output}
    return [n for n in m.graph.node if n.op_type == "InstanceNormalization"
            and getattr(prod.get(n.input[0]), "op_type", "") != "Reshape"]


def _feeds(batch: int = 3) -> dict[str, np.ndarray]:
    return {"sample": np.random.default_rng(0).standard_normal((batch, 1, 16, 16)).astype(np.float32),
            "timestep": np.array([10.0, 500.0, 900.0][:batch], np.float32)}


def _rel(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)


def test_channel_group_rewrite_is_exact_in_float(tmp_path):
    unet = make_tiny_unet(attention=True, norm_num_groups=GROUPS)
    want = _channel_group_norms(unet)
    assert want >= 3  # the 16-channel resnet norms and conv_norm_out
    m = onnx.load(str(export_fp_onnx(unet, tmp_path / "fp.onnx")))
    assert _direct_instance_norms(m) == []  # the FP reference keeps the exporter's form
    assert instance_norm_channel_groups(m) == want
    direct = _direct_instance_norms(m)
    assert len(direct) == want
    ins = [n for n in m.graph.node if n.op_type == "InstanceNormalization"]
    assert len(ins) > want  # the 32-channel norms (two channels per group) keep the Reshape form
    assert instance_norm_channel_groups(m) == 0  # nothing left to rewrite
    f = _feeds()
    got = make_session(m, OrtConfig(optimization_level="all", provider="cpu")).run(None, f)[0]
    with torch.no_grad():
        ref = unet(torch.from_numpy(f["sample"]), torch.from_numpy(f["timestep"])).sample.numpy()
    assert np.max(_rel(got, ref)) < 1e-5


def test_qdq_export_writes_channel_groups_as_instance_norm(tmp_path):
    q = make_quantized("w8a8", norm_num_groups=GROUPS)
    m = onnx.load(str(export_unet(q.unet, tmp_path / "u.onnx").path))
    direct = _direct_instance_norms(m)
    assert len(direct) == _channel_group_norms(q.unet) >= 3
    cons = {}
    for n in m.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n.op_type)
    # the affine is folded into the node: its output goes straight to SiLU (or the next layer), not to Mul/Add
    assert all(cons[n.output[0]] and "Add" not in cons[n.output[0]] for n in direct)
    assert all(len(onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == n.input[1])))
               == GROUPS for n in direct)
    f = _feeds()
    got = make_session(m, OrtConfig(mode="qdq", provider="cpu")).run(None, f)[0]
    with torch.no_grad():
        ref = q(torch.from_numpy(f["sample"]), torch.tensor([10, 500, 900])).numpy()
    assert np.median(_rel(got, ref)) < 1e-3


def test_openvino_runs_the_instance_norm_channels_last(tmp_path):
    """The reason for the rewrite: OpenVINO had to reorder the channels-last tensor to planar for the Reshape in
    front of every MVN; the rewritten norms' MVN reads the convolution's layout directly."""
    pytest.importorskip("openvino", reason="openvino not installed")
    from engines.openvino import OvConfig, compile_onnx

    q = make_quantized("w8a8", norm_num_groups=GROUPS)
    path = export_unet(q.unet, tmp_path / "u.onnx").path
    m = onnx.load(str(path))
    n_direct = len(_direct_instance_norms(m))
    n_reshaped = sum(1 for n in m.graph.node if n.op_type == "InstanceNormalization") - n_direct
    assert n_direct >= 3 and n_reshaped >= 1
    rt = compile_onnx(path, OvConfig(precision="f32", threads=1), batch=2).get_runtime_model()

    def kind(op) -> str:
        return op.get_rt_info()["layerType"].astype(str)

    feeders = [kind(op.input_value(0).get_node()) for op in rt.get_ordered_ops() if kind(op) == "MVN"]
    assert len(feeders) == n_direct + n_reshaped
    assert feeders.count("Reshape") == n_reshaped  # two channels per group: still planar, behind a Reshape
    assert sum(1 for f in feeders if f not in ("Reshape", "Reorder")) == n_direct  # straight from conv / add
