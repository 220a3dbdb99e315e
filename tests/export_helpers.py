"""Small quantized UNets and hand-built QDQ graphs for the export / lint / engine tests (CPU, seeded)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from pqcad_export.bits import parse_bits
from pqcad_export.model_io import DEFAULT_SCHEDULER_CONFIG


def make_quantized(bits: str = "w8a8", attention: bool = True, attn_matmul: bool = True, seed: int = 0,
                   norm_num_groups: int = 8):
    """A frozen QuantizedModel of the tiny attention UNet: round-to-nearest weights, percentile act steps."""
    from conftest import make_tiny_unet

    from pqcad_export.quantize.blocks import call_unet
    from pqcad_export.quantize.model import QuantizedModel
    from pqcad_export.quantize.wrap import attn_processors, freeze_all, quant_layers, wrap_unet

    unet = make_tiny_unet(attention=attention, seed=seed, norm_num_groups=norm_num_groups)
    cfg = dict(unet.config)
    wrap_unet(unet, parse_bits(bits), attn_matmul_quant=attn_matmul)
    for _, m in quant_layers(unet):  # max-abs per-channel steps (the MSE search is too slow for unit tests)
        w = m.w_fp
        amax = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-8)
        m.wq.delta = amax / m.wq.qmax
    qs = [q for _, m in list(quant_layers(unet)) + list(attn_processors(unet)) for q in m.act_quantizers()]
    for q in qs:
        q.calibrating = True
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        call_unet(unet, {"sample": torch.randn(4, 1, 16, 16, generator=g),
                         "timestep": torch.tensor([1, 250, 500, 999])})
    for q in qs:
        q.init_from_data(method="percentile")
    freeze_all(unet)
    meta = {"scheduler_config": dict(DEFAULT_SCHEDULER_CONFIG), "unet_config": cfg, "class_name": "UNet2DModel",
            "steps": 100}
    return QuantizedModel(unet=unet, bits=parse_bits(bits), method="direct", meta=meta)


def _model(nodes, inits, inputs, outputs, opset=17, ir=8):
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def conv_qdq(zp: int = 0, act_scale: float = 0.05, w_axis: int = 0, int4_weight: bool = False,
             per_channel_act: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ(w_int8)) with knobs to break one TensorRT rule at a time."""
    rng = np.random.default_rng(seed)
    cout, cin = 8, 4
    w = rng.integers(-8, 8, (cout, cin, 3, 3)).astype(np.int8)
    n_ws = (cout, cin)[w_axis]
    if int4_weight:
        w_init = h.make_tensor("w_int", T.INT4, list(w.shape), w.ravel().tolist())
        wzp = h.make_tensor("w_zp", T.INT4, [n_ws], [0] * n_ws)
    else:
        w_init, wzp = nh.from_array(w, "w_int"), nh.from_array(np.zeros(n_ws, np.int8), "w_zp")
    a_s = np.full(cin, act_scale, np.float32) if per_channel_act else np.array(act_scale, np.float32)
    a_zp = np.full(cin, zp, np.int8) if per_channel_act else np.array(zp, np.int8)
    inits = [w_init, nh.from_array(np.full(n_ws, 0.01, np.float32), "w_s"), wzp, nh.from_array(a_s, "a_s"),
             nh.from_array(a_zp, "a_zp"), nh.from_array(np.zeros(cout, np.float32), "b")]
    nodes = [h.make_node("QuantizeLinear", ["x", "a_s", "a_zp"], ["xq"], name="q_x", axis=1),
             h.make_node("DequantizeLinear", ["xq", "a_s", "a_zp"], ["xd"], name="dq_x", axis=1),
             h.make_node("DequantizeLinear", ["w_int", "w_s", "w_zp"], ["wd"], name="dq_w", axis=w_axis),
             h.make_node("Conv", ["xd", "wd", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return _model(nodes, inits, [h.make_tensor_value_info("x", T.FLOAT, ["N", cin, 8, 8])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["N", cout, 8, 8])], opset=21 if int4_weight else 17,
                  ir=10 if int4_weight else 8)


def matmul_int4(block: int = 16, axis: int = 0, quantize_act: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[N,S,K] @ DQ_int4(W[K,N_out], blocked) (+ optional activation Q/DQ)."""
    rng = np.random.default_rng(seed)
    k, n = 32, 16
    w = rng.integers(-8, 8, (k, n)).astype(np.int8)
    sshape = [k // block, n] if axis == 0 else [k, n // block]
    inits = [h.make_tensor("w4", T.INT4, [k, n], w.ravel().tolist()),
             nh.from_array(np.full(sshape, 0.02, np.float32), "w4_s"),
             h.make_tensor("w4_zp", T.INT4, sshape, [0] * int(np.prod(sshape))),
             nh.from_array(np.array(0.05, np.float32), "a_s"), nh.from_array(np.array(0, np.int8), "a_zp")]
    nodes = [h.make_node("DequantizeLinear", ["w4", "w4_s", "w4_zp"], ["wd"], name="dq_w4", axis=axis,
                         block_size=block)]
    src = "x"
    if quantize_act:
        nodes += [h.make_node("QuantizeLinear", ["x", "a_s", "a_zp"], ["xq"], name="q_x"),
                  h.make_node("DequantizeLinear", ["xq", "a_s", "a_zp"], ["xd"], name="dq_x")]
        src = "xd"
    nodes.append(h.make_node("MatMul", [src, "wd"], ["y"], name="mm"))
    return _model(nodes, inits, [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, k])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, n])], opset=21, ir=10)
