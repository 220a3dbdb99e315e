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
    fp_in = [e["layer"] for e in res.expected if e["weight"] == "int8" and not e["act"]]  # FP inputs (wrap.py)
    assert c["int4_weight_only"] == res.n_int4_weights and sorted(fp_in) == ["conv_in", "conv_out"]
    assert c["float"] == len(fp_in)
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


@pytest.mark.slow
def test_conditional_unet_export(tmp_path):
    """Cross-attention UNet: encoder_hidden_states input, lint clean, parity, RTX build."""
    import torch
    from conftest import make_tiny_cond_unet

    from pqcad_export.bits import parse_bits
    from pqcad_export.quantize.blocks import call_unet
    from pqcad_export.quantize.wrap import attn_processors, freeze_all, quant_layers, wrap_unet

    u = make_tiny_cond_unet()
    wrap_unet(u, parse_bits("w8a8"), attn_matmul_quant=True)
    for _, m in quant_layers(u):
        w = m.w_fp
        m.wq.delta = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-8) / m.wq.qmax
    qs = [q for _, m in list(quant_layers(u)) + list(attn_processors(u)) for q in m.act_quantizers()]
    for q in qs:
        q.calibrating = True
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        call_unet(u, {"sample": torch.randn(2, 2, 8, 8, generator=g), "timestep": torch.tensor([1, 999]),
                      "encoder_hidden_states": torch.randn(2, 5, 16, generator=g)})
    for q in qs:
        q.init_from_data(method="percentile")
    freeze_all(u)
    res = export_unet(u, tmp_path / "cond.onnx", ExportConfig(cond_seq_len=5))
    assert lint_model(res.path).ok
    par = check_parity(res.path, u, ParityConfig(timesteps=(999, 1), batch=2, cond_seq_len=5))
    assert par.ok, par.notes
    if HAVE_RTX:
        from engines.tensorrt import TrtConfig, build_trt_engine

        info = build_trt_engine(res.path, tmp_path / "eng", TrtConfig(compute_capability="SM86", max_batch=2,
                                                                      opt_batch=1), "tensorrt-rtx")
        fp_in = [e["layer"] for e in res.expected if not e["act"]]  # conv_in / conv_out inputs stay FP
        assert sorted(fp_in) == ["conv_in", "conv_out"]
        assert info.precision["quantized_layers"]["float"] == len(fp_in)
        assert "encoder_hidden_states" in info.input_names
