"""QDQ ONNX export of a quantized UNet: the learned integers and scales, exactly, in the form TensorRT executes.

Route: an "export view" of the model replaces each quantized layer by a module whose weight is an int8 buffer
passed through a DequantizeLinear (custom autograd.Function with an ONNX symbolic), and whose input passes
QuantizeLinear -> DequantizeLinear with the learned per-tensor step (zero point 0, int8). The TorchScript exporter
(dynamo=False; same on torch 2.11 and 2.13) writes those nodes verbatim, so initializers hold the saved integers.
Linear weights are stored transposed ([in, out], per-channel axis 1) so the MatMul consumes the DQ directly.
Split convs (Q-Diffusion) become two Convs + Add. With `int4_weight_only_matmul`, 4-bit Linear weights are
re-packed as INT4 blocked DequantizeLinear (opset 21) and their activations are left unquantized (TensorRT INT4
is weight-only).

Inputs: sample [B,C,H,W] float32, timestep [B] float32 (exact for integer steps < 2^24; float is handled by every
TensorRT version, int64 is not), encoder_hidden_states [B,S,D] float32 for conditional UNets; output eps.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from ..errors import PqcadError
from .lint import EXPECT_KEY

EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf's 2 GiB limit, with margin
INT4_BLOCK_SIZES = (128, 64, 32, 16)


@dataclass
class ExportConfig:
    """Options of the QDQ export."""

    opset: int = 17                     # >= 17; forced to 21 when INT4 weights are written
    int4_weight_only_matmul: bool = False
    int4_block_size: int = 0            # 0 = largest of 128/64/32/16 dividing the input features
    external_data: Optional[bool] = None  # None = only when the model is >= 1 GiB
    dynamic_batch: bool = True
    cond_seq_len: int = 0               # sequence length of encoder_hidden_states (0 = from the model config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportResult:
    path: Path
    opset: int
    expected: list[dict[str, Any]] = field(default_factory=list)
    n_int8_weights: int = 0
    n_int4_weights: int = 0
    n_act_qdq: int = 0
    external_data: bool = False
    weight_map: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer -> initializer names + layout


# ------------------------------------------------------------------------------------------ ONNX-exportable ops
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

    @staticmethod
    def _maybe(q, x):
        return q(x) if q is not None else x

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attention_mask is not None:
            raise PqcadError("attention masks are not supported by the QDQ exporter")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = self._maybe(self.aq_q, attn.head_to_batch_dim(query))
        key_t = self._maybe(self.aq_k, attn.head_to_batch_dim(key).transpose(-1, -2))
        value = self._maybe(self.aq_v, attn.head_to_batch_dim(value))
        scores = torch.matmul(query, key_t) * attn.scale
        probs = scores.float().softmax(dim=-1).to(query.dtype) if attn.upcast_softmax else scores.softmax(dim=-1)
        probs = self._maybe(self.aq_p, probs)
        hidden_states = attn.batch_to_head_dim(torch.matmul(probs, value))
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


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
def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


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


# ------------------------------------------------------------------------------------------ export
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


def export_unet(unet: nn.Module, out: str | Path, cfg: Optional[ExportConfig] = None,
                meta: Optional[dict[str, Any]] = None) -> ExportResult:
    """Export a quantized (frozen) diffusers UNet to QDQ ONNX at `out`."""
    cfg = cfg or ExportConfig()
    if cfg.opset < 17:
        raise PqcadError(f"--opset {cfg.opset} is too old: QDQ export needs opset >= 17")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    view, layers = export_view(unet, cfg.int4_weight_only_matmul)
    if not layers:
        raise PqcadError("model has no quantized layers to export (quantize it first)")
    ucfg = view.config
    conditional = type(view).__name__ == "UNet2DConditionModel"
    size = ucfg.sample_size if isinstance(ucfg.sample_size, int) else ucfg.sample_size[0]
    shape = (int(ucfg.in_channels), int(size), int(size))
    x = torch.randn(2, *shape)
    t = torch.tensor([10.0, 500.0])
    args: tuple = (x, t)
    names = ["sample", "timestep"]
    dyn = {"sample": {0: "batch"}, "timestep": {0: "batch"}, "eps": {0: "batch"}}
    if conditional:
        seq = cfg.cond_seq_len or 77
        c = torch.randn(2, seq, int(ucfg.cross_attention_dim))
        args = (x, t, c)
        names.append("encoder_hidden_states")
        dyn["encoder_hidden_states"] = {0: "batch"}
    wrapper = _UNetIO(view, conditional).eval()
    use_int4 = any(L["kind"] == "linear_int4" for L in layers)
    export_opset = min(cfg.opset, 20) if use_int4 else cfg.opset
    final_opset = max(cfg.opset, 21) if use_int4 else cfg.opset
    tmp = out.with_suffix(".tmp.onnx")
    kw = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapper, args, str(tmp), input_names=names, output_names=["eps"],
                              dynamic_axes=dyn if cfg.dynamic_batch else None, opset_version=export_opset,
                              do_constant_folding=True, **kw)
        except Exception as exc:
            raise PqcadError(f"ONNX export failed: {str(exc).splitlines()[0][:300]}") from None
    model = onnx.load(str(tmp))
    tmp.unlink(missing_ok=True)
    for extra in list(tmp.parent.glob(tmp.name + "*")):
        extra.unlink()
    _fold_constant_nodes(model)
    from .graph_cost import fold_concat_slices, remove_dead_initializers

    fold_concat_slices(model)  # split convs read the concatenation's inputs, not slices of it (same values)
    exp = _expectations(model, layers)
    n_int4 = 0
    if use_int4:
        if any(n.op_type == "GroupNormalization" for n in model.graph.node):
            raise PqcadError("cannot raise opset to 21: graph uses GroupNormalization (semantics changed in 21)")
        n_int4 = _to_int4(model, exp, cfg.int4_block_size)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = final_opset
    model.ir_version = 10 if final_opset >= 21 else 8
    remove_dead_initializers(model)  # engines warn about every unused initializer
    wmap = _weight_map(model, exp)
    md = {EXPECT_KEY: json.dumps(exp), "pqcad.sample_shape": ",".join(map(str, shape)),
          "pqcad.timestep_dtype": "float32", "pqcad.export": json.dumps(cfg.to_dict()),
          "pqcad.weight_map": json.dumps(wmap), "pqcad.conditional": str(conditional).lower()}
    for k, v in (meta or {}).items():
        md[f"pqcad.meta.{k}"] = v if isinstance(v, str) else json.dumps(v, default=str)
    for k, v in md.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    model.producer_name = "pqcad-export"
    size_bytes = model.ByteSize()
    ext = cfg.external_data if cfg.external_data is not None else size_bytes >= EXTERNAL_DATA_THRESHOLD
    onnx.checker.check_model(model, full_check=False)
    if ext:
        data_name = out.name + ".data"
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, str(out))
    n_qdq = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    return ExportResult(path=out, opset=final_opset, expected=exp,
                        n_int8_weights=sum(1 for e in exp if e.get("weight") == "int8"), n_int4_weights=n_int4,
                        n_act_qdq=n_qdq, external_data=bool(ext), weight_map=wmap)


def check_initializers(onnx_path: str | Path, unet: nn.Module) -> dict[str, Any]:
    """Exported weight initializers equal the model's saved integers (and scales), layer by layer."""
    from ..quantize.layers import SplitQuantConv2d

    model = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in model.metadata_props}
    wmap = json.loads(meta.get("pqcad.weight_map", "{}"))
    inits = {t.name: t for t in model.graph.initializer}
    mods = dict(unet.named_modules())
    mismatches, checked = [], 0
    parts: dict[str, list[np.ndarray]] = {}
    for layer, d in wmap.items():
        base = layer.rsplit(".part", 1)[0] if ".part" in layer else layer
        w = onnx.numpy_helper.to_array(inits[d["initializer"]]).astype(np.int8)
        s = onnx.numpy_helper.to_array(inits[d["scale"]]).astype(np.float32)
        m = mods.get(base)
        if m is None:
            mismatches.append(f"{layer}: no such layer in the model")
            continue
        if d["layout"] == "transposed":
            w = w.T
            if s.ndim == 2:  # INT4 blocked: every block row carries the per-channel scale
                if not np.all(s == s[:1]):
                    mismatches.append(f"{layer}: blocked scales differ across blocks")
                s = s[0]
        if isinstance(m, SplitQuantConv2d):
            parts.setdefault(base, []).append(w)
            if len(parts[base]) < 2:
                continue
            w = np.concatenate(parts[base], axis=1)
        want = m.weight_int().cpu().numpy().astype(np.int8)
        want_s = m.weight_scale().cpu().numpy().astype(np.float32)
        checked += 1
        if w.shape != want.shape or not np.array_equal(w, want):
            mismatches.append(f"{base}: integers differ ({int(np.sum(w != want)) if w.shape == want.shape else 'shape'})")
        if s.shape != want_s.shape or not np.array_equal(s, want_s):
            mismatches.append(f"{base}: scales differ")
    n_layers = sum(1 for _, mm in unet.named_modules() if hasattr(mm, "weight_int"))
    if checked != n_layers:
        mismatches.append(f"{checked} of {n_layers} quantized layers found in the ONNX weight map")
    return {"checked_layers": checked, "quantized_layers": n_layers, "mismatches": mismatches,
            "ok": not mismatches}
