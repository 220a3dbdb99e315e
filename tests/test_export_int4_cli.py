"""`--int4-weight-only-matmul` export and the `export` CLI round trip (save_quantized -> export -> reports)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from export_helpers import make_quantized

from pqcad_export.cli import main
from pqcad_export.export.lint import lint_model
from pqcad_export.export.onnx import ExportConfig, check_initializers, export_unet
from pqcad_export.export.parity import ParityConfig, check_parity

try:
    import tensorrt_rtx_bindings  # noqa: F401

    HAVE_RTX = True
except Exception:  # pragma: no cover
    HAVE_RTX = False


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx_bindings not installed (pip install .[dev])")
def test_int4_weight_only_matmul_export(tmp_path):
    from engines.tensorrt import TrtConfig, build_trt_engine

    q = make_quantized("w4a8")
    res = export_unet(q.unet, tmp_path / "i4.onnx", ExportConfig(int4_weight_only_matmul=True))
    assert res.opset == 21 and res.n_int4_weights > 0
    rep = lint_model(res.path)
    assert rep.ok and rep.stats["int4_weights"] == res.n_int4_weights
    assert check_initializers(res.path, q.unet)["ok"]
    info = build_trt_engine(res.path, tmp_path / "eng", TrtConfig(compute_capability="SM89", max_batch=2,
                                                                  opt_batch=1), "tensorrt-rtx")
    c = info.precision["quantized_layers"]
    assert c["int4_weight_only"] == res.n_int4_weights and c["float"] == 0
    par = check_parity(res.path, q, ParityConfig(timesteps=(500,), batch=2))
    assert par.ok, par.notes


@pytest.mark.slow
def test_export_cli_roundtrip(tmp_path):
    from pqcad_export.quantize.saved import save_quantized

    q = make_quantized("w8a8", attn_matmul=False)
    save_quantized(q, tmp_path / "quant")
    out = tmp_path / "export" / "unet.onnx"
    r = CliRunner().invoke(main, ["export", "--quantized", str(tmp_path / "quant"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and (out.parent / "lint.json").is_file() and (out.parent / "parity.json").is_file()
    assert "lint: PASS" in r.output
    r = CliRunner().invoke(main, ["export", "--quantized", str(tmp_path / "nope"), "--out", str(out)])
    assert r.exit_code == 1 and "not a quantized model directory" in r.output
    r = CliRunner().invoke(main, ["export", "--quantized", str(tmp_path / "quant"), "--out", str(out),
                                  "--opset", "13"])
    assert r.exit_code == 2
