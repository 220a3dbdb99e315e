"""The export view of a quantized UNet: each quantized layer replaced by a module that the TorchScript exporter
writes as DequantizeLinear weights and QuantizeLinear -> DequantizeLinear activations (see onnx.py)."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PqcadError
from ..quantize.attention import quant_attention
from ..quantize.wrap import _set_module


class _DQWeight(torch.autograd.Function):
    """w_int (int8 constant) * scale along `axis` -> DequantizeLinear(w_int, scale, 0, axis)."""

    @staticmethod
    def forward(ctx, w_int, scale, axis: int, channels: int):
        shape = [1] * w_int.dim()
        shape[axis] = -1
        return w_int.to(torch.float32) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, w_int, scale, axis: int, channels: int):
        zp = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int8))
        return g.op("DequantizeLinear", w_int, scale, zp, axis_i=axis)


class _QDQAct(torch.autograd.Function):
    """Symmetric per-tensor fake quantization; exports as QuantizeLinear -> DequantizeLinear (int8, zp 0)."""

    @staticmethod
    def forward(ctx, x, scale, qmin: int, qmax: int):
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale

    @staticmethod
    def symbolic(g, x, scale, qmin: int, qmax: int):
        zp = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        q = g.op("QuantizeLinear", x, scale, zp)
        return g.op("DequantizeLinear", q, scale, zp)


class QDQ(nn.Module):
    """Export-view activation quantizer (scale stored as a float32 scalar buffer)."""

    def __init__(self, scale: float, bits: int):
        super().__init__()
        if not scale > 0:
            raise PqcadError(f"activation scale must be positive, got {scale}")
        if bits > 8:
            raise PqcadError(f"{bits}-bit activations cannot be written as int8 Q/DQ")
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def forward(self, x):
        return _QDQAct.apply(x, self.scale, self.qmin, self.qmax)


def _act(layer, idx: int = 0) -> Optional[QDQ]:
    qs = layer.act_quantizers()
    q = qs[idx]
    return QDQ(q.step(), q.bits) if q.enabled else None


class ExportConv(nn.Module):
    def __init__(self, layer, name: str):
        super().__init__()
        self.qname = name
        self.register_buffer("w_int", layer.weight_int().to(torch.int8).contiguous())
        self.register_buffer("w_scale", layer.weight_scale().to(torch.float32).contiguous())
        self.n_out = int(self.w_scale.numel())  # a Python int, so the ONNX symbolic sees a constant
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), False)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, \
            layer.groups
        self.aq = _act(layer)
        self.weight_bits = layer.weight_bits

    def forward(self, x):
        if self.aq is not None:
            x = self.aq(x)
        w = _DQWeight.apply(self.w_int, self.w_scale, 0, self.n_out)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ExportSplitConv(nn.Module):
    """conv(cat(q1(a), q2(b))) == conv_a(q1(a)) + conv_b(q2(b)): two Convs + Add (legal for TensorRT)."""

    def __init__(self, layer, name: str):
        super().__init__()
        self.qname = name
        s = layer.split
        w = layer.weight_int().to(torch.int8)
        self.split = s
        self.register_buffer("w_int_a", w[:, :s].contiguous())
        self.register_buffer("w_int_b", w[:, s:].contiguous())
        self.register_buffer("w_scale", layer.weight_scale().to(torch.float32).contiguous())
        self.n_out = int(self.w_scale.numel())  # a Python int, so the ONNX symbolic sees a constant
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), False)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, \
            layer.groups
        if layer.groups != 1:
            raise PqcadError(f"split conv {name} with groups={layer.groups} cannot be split")
        self.aq, self.aq2 = _act(layer, 0), _act(layer, 1)
        self.weight_bits = layer.weight_bits

    def forward(self, x):
        a, b = x[:, : self.split], x[:, self.split:]
        if self.aq is not None:
            a = self.aq(a)
        if self.aq2 is not None:
            b = self.aq2(b)
        wa = _DQWeight.apply(self.w_int_a, self.w_scale, 0, self.n_out)
        wb = _DQWeight.apply(self.w_int_b, self.w_scale, 0, self.n_out)
        ya = F.conv2d(a, wa, None, self.stride, self.padding, self.dilation, self.groups)
        yb = F.conv2d(b, wb, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return ya + yb


class ExportLinear(nn.Module):
    """x @ DQ(w_int^T) + b: MatMul with the weight as B [in, out], per-channel scale on axis 1."""

    def __init__(self, layer, name: str, int4: bool = False):
        super().__init__()
        self.qname = name
        self.register_buffer("w_int_t", layer.weight_int().to(torch.int8).t().contiguous())
        self.register_buffer("w_scale", layer.weight_scale().to(torch.float32).contiguous())
        self.n_out = int(self.w_scale.numel())  # a Python int, so the ONNX symbolic sees a constant
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), False)
        self.int4 = int4
        self.aq = None if int4 else _act(layer)
        self.weight_bits = layer.weight_bits

    def forward(self, x):
        if self.aq is not None:
            x = self.aq(x)
        w = _DQWeight.apply(self.w_int_t, self.w_scale, 1, self.n_out)
        y = torch.matmul(x, w)
        return y + self.bias if self.bias is not None else y


class ExportAttnProcessor(nn.Module):
    """diffusers AttnProcessor math with Q/DQ on q, k^T, v and the softmax output (per-tensor, so quantizing
    k after the transpose is identical) so each attention MatMul consumes DequantizeLinear outputs directly."""

    def __init__(self, proc):
        super().__init__()
        qs = proc.act_quantizers()
        self.aq_q, self.aq_k, self.aq_v, self.aq_p = [QDQ(q.step(), q.bits) if q.enabled else None for q in qs]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        return quant_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                               [self.aq_q, self.aq_k, self.aq_v, self.aq_p], qdq_graph=True)


class _UNetIO(nn.Module):
    """Fixed signature (sample, timestep[, encoder_hidden_states]) -> eps for the exporter."""

    def __init__(self, unet: nn.Module, conditional: bool):
        super().__init__()
        self.unet = unet
        self.conditional = conditional

    def forward(self, sample, timestep, encoder_hidden_states=None):
        if self.conditional:
            out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)
        else:
            out = self.unet(sample, timestep, return_dict=False)
        return out[0]


# ------------------------------------------------------------------------------------------ export view
def export_view(unet: nn.Module, int4_weight_only_matmul: bool = False) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Deep copy of the quantized UNet with export modules; returns (view, per-layer descriptions)."""
    from ..quantize.attention import QuantAttnProcessor
    from ..quantize.layers import QuantConv2d, QuantLinear, SplitQuantConv2d

    view = copy.deepcopy(unet).eval().float().cpu()
    layers = []
    for name, m in list(view.named_modules()):
        if isinstance(m, SplitQuantConv2d):
            new = ExportSplitConv(m, name)
            kind = "split"
        elif isinstance(m, QuantConv2d):
            new = ExportConv(m, name)
            kind = "conv"
        elif isinstance(m, QuantLinear):
            int4 = int4_weight_only_matmul and m.weight_bits <= 4
            new = ExportLinear(m, name, int4=int4)
            kind = "linear_int4" if int4 else "linear"
        else:
            continue
        _set_module(view, name, new)
        acts = [q is not None for q in ([new.aq, new.aq2] if kind == "split" else [new.aq])]
        layers.append({"name": name, "kind": kind, "weight_bits": m.weight_bits, "act_quant": acts})
    for name, m in list(view.named_modules()):
        if hasattr(m, "set_processor") and isinstance(getattr(m, "processor", None), QuantAttnProcessor):
            proc = m.processor
            if proc.act_quant_enabled:
                m.set_processor(ExportAttnProcessor(proc))
                layers.append({"name": name, "kind": "attn", "act_quant": [q.enabled for q in
                                                                          proc.act_quantizers()]})
            else:
                m.set_processor(proc.fp_processor)
    return view, layers
