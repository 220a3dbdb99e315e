"""Plain (unquantized) ONNX export of the FP teacher: what compare's FP engine references and the latency
benchmark run on ONNX Runtime and OpenVINO, so INT8 is judged against the FP engines a deployment would use."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import PqcadError


def export_fp_onnx(unet: nn.Module, out: str | Path, opset: int = 17) -> Path:
    """sample [B,C,H,W] f32, timestep [B] f32 -> eps; same I/O and metadata keys as the QDQ export."""
    from .graph_cost import remove_dead_initializers
    from .onnx import _fold_constant_nodes, _UNetIO

    if type(unet).__name__ == "UNet2DConditionModel":
        raise PqcadError("FP ONNX references support unconditional UNets only")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (int(cfg.in_channels), int(size), int(size))
    tmp = out.with_suffix(".tmp.onnx")
    kw = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    wrapper = _UNetIO(unet.float().eval(), False).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapper, (torch.randn(2, *shape), torch.tensor([1.0, 500.0])), str(tmp),
                              input_names=["sample", "timestep"], output_names=["eps"],
                              dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"}, "eps": {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, **kw)
        except Exception as exc:
            raise PqcadError(f"FP ONNX export failed: {str(exc).splitlines()[0][:300]}") from None
    model = onnx.load(str(tmp))
    tmp.unlink(missing_ok=True)
    _fold_constant_nodes(model)
    remove_dead_initializers(model)
    for k, v in {"pqcad.sample_shape": ",".join(map(str, shape)), "pqcad.timestep_dtype": "float32",
                 "pqcad.precision": "fp32"}.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    model.producer_name = "pqcad-export"
    onnx.save_model(model, str(out))
    return out
