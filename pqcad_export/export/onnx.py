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

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import PqcadError
from .lint import EXPECT_KEY
from .onnx_graph import INT4_BLOCK_SIZES, _expectations, _fold_constant_nodes, _to_int4, _weight_map
from .view import QDQ, ExportAttnProcessor, ExportConv, ExportLinear, ExportSplitConv, _UNetIO, export_view

EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf's 2 GiB limit, with margin

__all__ = ["EXTERNAL_DATA_THRESHOLD", "INT4_BLOCK_SIZES", "ExportConfig", "ExportResult", "QDQ", "ExportConv",
           "ExportSplitConv", "ExportLinear", "ExportAttnProcessor", "export_view", "export_unet", "check_initializers"]


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
    from .graph_cost import fold_concat_slices, instance_norm_channel_groups, remove_dead_initializers

    fold_concat_slices(model)  # split convs read the concatenation's inputs, not slices of it (same values)
    instance_norm_channel_groups(model)  # GroupNorm with C == groups: one InstanceNormalization, no Reshapes
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
