"""TensorRT QDQ rule check on hand-built graphs, cross-checked with the real TensorRT-RTX ONNX parser."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from export_helpers import conv_qdq, matmul_int4
from onnx import helper as h

from pqcad_export.cli import main
from pqcad_export.export.lint import EXPECT_KEY, lint_model

try:
    import tensorrt_rtx_bindings  # noqa: F401

    HAVE_RTX = True
except Exception:  # pragma: no cover - the dev extra installs it
    HAVE_RTX = False
needs_rtx = pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx_bindings not installed (pip install .[dev])")


def rtx_parse(model: onnx.ModelProto, tmp_path, name="m.onnx"):
    from engines.tensorrt import import_tensorrt, parse_onnx

    p = tmp_path / name
    onnx.save(model, str(p))
    return parse_onnx(p, import_tensorrt("tensorrt-rtx"))


def test_clean_conv_passes():
    rep = lint_model(conv_qdq())
    assert rep.ok, rep.to_dict()
    assert rep.stats["quantized_conv"] == 1


def test_nonzero_zero_point_fails_lint_and_rtx(tmp_path):
    m = conv_qdq(zp=3)
    rep = lint_model(m)
    assert not rep.ok and "zero-point" in rep.rules_failed()
    assert any("non-zero zero point" in v.message for v in rep.errors)
    if HAVE_RTX:
        pr = rtx_parse(m, tmp_path)
        assert not pr.ok and "zero point" in pr.errors[0].lower()


def test_negative_scale_and_per_channel_activation_fail():
    rep = lint_model(conv_qdq(act_scale=-0.05))
    assert "scale-positive" in rep.rules_failed()
    rep = lint_model(conv_qdq(per_channel_act=True))
    assert "activation-per-tensor" in rep.rules_failed()


def test_weight_scale_on_wrong_axis_fails():
    rep = lint_model(conv_qdq(w_axis=1))
    assert "weight-axis" in rep.rules_failed()


def test_int4_conv_weight_fails_lint_and_rtx(tmp_path):
    m = conv_qdq(int4_weight=True)
    rep = lint_model(m)
    assert "int4-conv" in rep.rules_failed()
    if HAVE_RTX:
        from engines.tensorrt import TensorRTBuildError, TrtConfig, build_trt_engine

        onnx.save(m, str(tmp_path / "i4conv.onnx"))
        with pytest.raises(TensorRTBuildError) as ei:
            build_trt_engine(tmp_path / "i4conv.onnx", tmp_path / "e", TrtConfig(compute_capability="SM89",
                                                                                    max_batch=2), "tensorrt-rtx")
        print("RTX:", ei.value)
        assert str(ei.value)


@needs_rtx
def test_int4_weight_only_matmul_passes_lint_and_rtx(tmp_path):
    from engines.tensorrt import TrtConfig, build_trt_engine

    m = matmul_int4()
    assert lint_model(m).ok, lint_model(m).to_dict()
    onnx.save(m, str(tmp_path / "i4.onnx"))
    info = build_trt_engine(tmp_path / "i4.onnx", tmp_path / "e", TrtConfig(compute_capability="SM89",
                                                                            max_batch=2), "tensorrt-rtx")
    assert info.validated and info.precision["quantized_layers"]["int4_weight_only"] == 1
    assert (tmp_path / "e" / "unet.plan").stat().st_size > 0


def test_int4_with_int8_activation_fails_lint_and_rtx(tmp_path):
    m = matmul_int4(quantize_act=True)
    rep = lint_model(m)
    assert "int4-weight-only" in rep.rules_failed()
    assert any("weight-only" in v.message for v in rep.errors)
    if HAVE_RTX:  # the builder rejects it too, with a far less readable message
        from engines.tensorrt import TensorRTBuildError, TrtConfig, build_trt_engine

        onnx.save(m, str(tmp_path / "i4a8.onnx"))
        with pytest.raises(TensorRTBuildError):
            build_trt_engine(tmp_path / "i4a8.onnx", tmp_path / "e", TrtConfig(compute_capability="SM89",
                                                                                 max_batch=2), "tensorrt-rtx")


def test_int4_block_axis_rules():
    assert lint_model(matmul_int4(axis=1)).ok  # last axis: legal
    m = matmul_int4()
    dq = next(n for n in m.graph.node if n.name == "dq_w4")
    del dq.attribute[:]
    dq.attribute.extend([h.make_attribute("axis", 0)])  # per-channel-like INT4 without blocks
    assert "int4-block-axis" in lint_model(m).rules_failed()


def test_custom_domain_and_missing_expected_quantization():
    m = conv_qdq()
    m.graph.node.append(h.make_node("Relu", ["y"], ["y2"], name="custom", domain="com.example"))
    p = m.metadata_props.add()
    p.key, p.value = EXPECT_KEY, json.dumps([{"node": "conv", "op": "Conv", "act": [0], "weight": "int8"},
                                             {"node": "gone", "op": "Conv", "act": [0], "weight": "int8"}])
    rep = lint_model(m)
    assert {"custom-domain", "expected-quantized"} <= rep.rules_failed()
    assert rep.stats["expected_ok"] == 1


def test_expected_activation_not_quantized_is_caught():
    m = conv_qdq()
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    conv.input[0] = "x"  # drop the activation Q/DQ
    p = m.metadata_props.add()
    p.key, p.value = EXPECT_KEY, json.dumps([{"node": "conv", "op": "Conv", "act": [0], "weight": "int8"}])
    rep = lint_model(m)
    assert "expected-quantized" in rep.rules_failed()
    assert any(v.rule == "partial-quant" for v in rep.warnings)


def test_gemm_transb_axis():
    w = np.ones((16, 8), np.int8)  # B as [N, K] with transB=1 -> per-channel must be axis 0
    inits = [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.full(16, .1, np.float32), "s"),
             onnx.numpy_helper.from_array(np.zeros(16, np.int8), "z"),
             onnx.numpy_helper.from_array(np.array(.1, np.float32), "as"),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "az")]

    def model(axis):
        nodes = [h.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"]),
                 h.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"]),
                 h.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], axis=axis),
                 h.make_node("Gemm", ["xd", "wd"], ["y"], transB=1)]
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])], inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])

    assert lint_model(model(0)).ok
    assert "weight-axis" in lint_model(model(1)).rules_failed()


def test_lint_cli_exit_codes_and_json(tmp_path):
    onnx.save(conv_qdq(), str(tmp_path / "ok.onnx"))
    onnx.save(conv_qdq(zp=5), str(tmp_path / "bad.onnx"))
    r = CliRunner().invoke(main, ["lint", str(tmp_path / "ok.onnx"), "--json", str(tmp_path / "ok.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ok.json").read_text())["ok"] is True
    r = CliRunner().invoke(main, ["lint", str(tmp_path / "bad.onnx"), "--json", str(tmp_path / "bad.json")])
    assert r.exit_code == 1
    assert "zero-point" in r.output
    assert json.loads((tmp_path / "bad.json").read_text())["n_errors"] >= 1
    r = CliRunner().invoke(main, ["lint", str(tmp_path / "missing.onnx")])
    assert r.exit_code == 1 and "no such ONNX file" in r.output
