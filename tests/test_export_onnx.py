"""QDQ export of W8A8 / W4A8 tiny attention UNets: lint clean, exact initializers, ORT parity, TensorRT-RTX
parses and builds for SM89 with every quantized layer INT8 (or INT4 weight-only where asked)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from export_helpers import make_quantized

from pqcad_export.export.lint import EXPECT_KEY, lint_model
from pqcad_export.export.onnx import check_initializers, export_unet
from pqcad_export.export.parity import ParityConfig, check_parity

try:
    import tensorrt_rtx_bindings  # noqa: F401

    HAVE_RTX = True
except Exception:  # pragma: no cover
    HAVE_RTX = False

QUICK_PARITY = ParityConfig(timesteps=(999, 500, 1), batch=2)


@pytest.fixture(scope="module", params=["w8a8", "w4a8"])
def exported(request, tmp_path_factory):
    q = make_quantized(request.param)
    d = tmp_path_factory.mktemp(f"exp_{request.param}")
    res = export_unet(q.unet, d / "unet.onnx")
    return request.param, q, res


def test_export_is_lint_clean_with_expectations(exported):
    bits, q, res = exported
    rep = lint_model(res.path)
    assert rep.ok, [v for v in rep.errors][:3]
    n_layers = sum(1 for _ in q.quant_layers())
    n_split = sum(1 for _, m in q.quant_layers() if m.kind == "split")
    n_attn = sum(1 for _ in q.attn_processors())
    assert n_split > 0 and n_attn > 0
    # every quantized layer (split convs twice) + 2 attention matmuls per attention block
    assert rep.stats["expected"] == rep.stats["expected_ok"] == n_layers + n_split + 2 * n_attn
    m = onnx.load(str(res.path))
    assert m.opset_import[0].version == 17
    exp = json.loads({p.key: p.value for p in m.metadata_props}[EXPECT_KEY])
    assert all(e["weight"] in ("int8", None) for e in exp)
    # dynamic batch; float32 timestep input
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert m.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # every Q/DQ zero point is int8 0
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    zps = [inits[n.input[2]] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)


def test_initializers_equal_saved_integers(exported):
    bits, q, res = exported
    chk = check_initializers(res.path, q.unet)
    assert chk["ok"], chk["mismatches"][:3]
    if bits == "w4a8":  # 4-bit grids stored as INT8 values
        m = onnx.load(str(res.path))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
        w = inits[res.weight_map["down_blocks.0.resnets.0.conv1"]["initializer"]]
        assert w.dtype == np.int8 and w.min() >= -8 and w.max() <= 7


def test_ort_parity(exported, tmp_path):
    bits, q, res = exported
    rep = check_parity(res.path, q, QUICK_PARITY, out_json=tmp_path / "parity.json")
    print(bits, "parity rel L2", rep.rel_l2, rep.samples_within_tol, "/", rep.samples_total, rep.notes)
    assert rep.ok, rep.notes
    assert rep.samples_within_tol >= rep.samples_total // 2
    assert json.loads((tmp_path / "parity.json").read_text())["initializers"]["ok"]


@pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx_bindings not installed (pip install .[dev])")
def test_rtx_builds_sm89_with_int8_layers(exported, tmp_path):
    from engines.tensorrt import TrtConfig, build_trt_engine

    bits, q, res = exported
    info = build_trt_engine(res.path, tmp_path / "eng", TrtConfig(compute_capability="SM89", max_batch=4,
                                                                  opt_batch=2), "tensorrt-rtx")
    counts = info.precision["quantized_layers"]
    fp_in = [e for e in res.expected if not e["act"]]  # conv_in / conv_out: int8 weights, FP inputs (wrap.py)
    assert {e["layer"] for e in fp_in} == {"conv_in", "conv_out"}
    assert counts["float"] == len(fp_in) and counts["int8"] == len(res.expected) - len(fp_in), counts
    man = json.loads((tmp_path / "eng" / "engine.json").read_text())
    assert man["validated"] is True and man["executed"] is False and man["device"] == "aot:SM89"
    assert (tmp_path / "eng" / "unet.plan").stat().st_size > 10_000
