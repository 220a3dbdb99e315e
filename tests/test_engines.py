"""Engines: ONNX Runtime INT8 session (kernels recorded), engine.json, backend choice, the `engine` CLI, and the
UNetFn contract (the DDIM sampler runs an engine)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from export_helpers import conv_qdq, make_quantized
from onnx import helper as h

from engines import EngineError, build_engine, load_engine, resolve_backend
from engines.base import LatencyStats
from engines.onnxruntime import OrtConfig, OrtEngine, kernel_summary, to_cpu_int8
from engines.tensorrt import tensorrt_available
from pqcad_export.cli import main


def _conv_relu(tmp_path):
    m = conv_qdq()
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    conv.output[0] = "y_conv"
    m.graph.node.append(h.make_node("Relu", ["y_conv"], ["y"], name="relu"))
    p = tmp_path / "conv_relu.onnx"
    onnx.save(m, str(p))
    return p


def test_cpu_int8_copy_runs_qlinearconv(tmp_path):
    p = _conv_relu(tmp_path)
    qdq = kernel_summary(p)
    assert qdq["int8_kernels"] == {} and qdq["n_float_compute"] == 1  # no output Q: no INT8 fusion
    m, stats = to_cpu_int8(onnx.load(str(p)), OrtConfig(u8_weights="no"))
    assert stats == {"u8_activation_qdq": 1, "requantized_conv_outputs": 1, "folded_matmul_scales": 0}
    zps = [onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "pqcad_cpu_u8_zp128"]
    assert zps[0].dtype == np.uint8 and int(zps[0]) == 128
    ks = kernel_summary(m)
    assert ks["int8_kernels"].get("QLinearConv") == 1 and ks["n_float_compute"] == 0


def test_u8_weights_keep_the_math_and_avoid_int16_saturation(tmp_path):
    from engines.onnxruntime import _random_feeds, make_session
    from pqcad_export.export.onnx import export_unet

    p = _conv_relu(tmp_path)
    m, stats = to_cpu_int8(onnx.load(str(p)), OrtConfig(u8_weights="yes"))
    assert stats["u8_weights"] == 1
    w = [onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "w_int"]
    assert w and w[0].dtype == np.uint8
    feeds = _random_feeds(m, 2, 0)
    plain, _ = to_cpu_int8(onnx.load(str(p)), OrtConfig(u8_weights="no"))
    a = make_session(m, OrtConfig(provider="cpu", optimization_level="basic")).run(None, feeds)[0]
    b = make_session(plain, OrtConfig(provider="cpu", optimization_level="basic")).run(None, feeds)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # unfused graph: w + 128 - 128 is exact
    # a W8A8 UNet: with u8 weights the INT8 engine stays close to the exact graph on any x86 CPU (on AVX2 without
    # VNNI, s8 weights gave 0.43 here: MLAS adds u8 x s8 product pairs in saturating int16)
    q = make_quantized("w8a8")
    res = export_unet(q.unet, tmp_path / "unet.onnx")
    info = build_engine(res.path, tmp_path / "u8w", "onnxruntime", ort_config=OrtConfig(u8_weights="yes"))
    assert info.precision["u8_weights"] >= 10 and info.precision["requant_rel_l2"] < 0.15


def test_int8_engine_with_s8_weights_is_refused_on_a_cpu_without_vnni(tmp_path, monkeypatch):
    import engines.onnxruntime as ortmod

    p = _conv_relu(tmp_path)
    build_engine(p, tmp_path / "s8", "onnxruntime", ort_config=OrtConfig(u8_weights="no"))
    man = json.loads((tmp_path / "s8" / "engine.json").read_text())
    man["precision"].pop("u8_weights", None)  # as an engine built on a VNNI CPU records it
    man["options"]["u8_weights"] = "auto"
    (tmp_path / "s8" / "engine.json").write_text(json.dumps(man))
    monkeypatch.setattr(ortmod, "x86_without_vnni", lambda: True)
    with pytest.raises(EngineError, match="rebuild the engine on this machine"):
        load_engine(tmp_path / "s8")
    monkeypatch.setattr(ortmod, "x86_without_vnni", lambda: False)
    assert load_engine(tmp_path / "s8") is not None  # a VNNI CPU runs it


def test_ort_engine_manifest_latency_and_load(tmp_path):
    p = _conv_relu(tmp_path)
    info = build_engine(p, tmp_path / "eng", "onnxruntime")
    man = json.loads((tmp_path / "eng" / "engine.json").read_text())
    assert man["backend"] == "onnxruntime" and man["precision"]["int8_kernels"] == {"QLinearConv": 1}
    assert man["precision"]["requant_rel_l2"] < 0.05
    assert "backend onnxruntime" in man["notes"][0]
    eng = load_engine(tmp_path / "eng")
    assert isinstance(eng, OrtEngine) and eng.sample_shape == (4, 8, 8)
    lat = eng.latency(batch=2, warmup=2, iters=10)
    assert isinstance(lat, LatencyStats) and lat.iters == 10 and lat.median_ms > 0
    x = torch.randn(3, 4, 8, 8)
    y = eng(x, torch.tensor([1, 2, 3]))
    assert y.shape == (3, 8, 8, 8) and torch.isfinite(y).all()
    assert info.executed is False


def test_backend_resolution_and_missing_tensorrt(tmp_path):
    chosen, why = resolve_backend("auto")
    if not (tensorrt_available() and torch.cuda.is_available()):
        from engines import CPU_FASTEST
        from engines.openvino import openvino_available

        assert chosen == (CPU_FASTEST if openvino_available() else "onnxruntime") and why
    with pytest.raises(EngineError):
        resolve_backend("tvm")
    p = _conv_relu(tmp_path)
    if not tensorrt_available():
        r = CliRunner().invoke(main, ["engine", "--onnx", str(p), "--out", str(tmp_path / "e"),
                                      "--backend", "tensorrt"])
        assert r.exit_code == 1
        err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "tensorrt" in err[0]
    r = CliRunner().invoke(main, ["engine", "--onnx", str(p), "--out", str(tmp_path / "e2")])
    assert r.exit_code == 0, r.output
    assert "backend:" in r.output
    r = CliRunner().invoke(main, ["engine", "--onnx", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "e3"),
                                  "--backend", "onnxruntime"])
    assert r.exit_code == 1 and "no such ONNX file" in r.output


def test_rtx_engine_cli(tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="tensorrt_rtx_bindings not installed")
    p = _conv_relu(tmp_path)
    r = CliRunner().invoke(main, ["engine", "--onnx", str(p), "--out", str(tmp_path / "rtx"),
                                  "--backend", "tensorrt-rtx", "--max-batch", "4"])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "rtx" / "engine.json").read_text())
    assert man["validated"] and not man["executed"] and man["precision"]["quantized_layers"]["int8"] == 1
    with pytest.raises(EngineError, match="not runnable|CUDA GPU"):
        load_engine(tmp_path / "rtx")


@pytest.mark.slow
def test_ddim_sampler_runs_ort_engine(tmp_path):
    from pqcad_export.export.onnx import export_unet
    from pqcad_export.sampling import SamplerConfig, ddim_sample

    q = make_quantized("w8a8")
    res = export_unet(q.unet, tmp_path / "unet.onnx")
    cfg = SamplerConfig(steps=5, batch_size=4, seed=0)
    ref = ddim_sample(q, q.scheduler_config, (1, 16, 16), 4, cfg)
    exact = build_engine(res.path, tmp_path / "qdq", "onnxruntime", ort_config=OrtConfig(mode="qdq"))
    fast = build_engine(res.path, tmp_path / "int8", "onnxruntime")
    assert fast.precision["int8_kernels"].get("QLinearConv", 0) >= 10
    assert exact.precision["int8_kernels"].get("MatMulIntegerToFloat", 0) >= 1
    # a random-init tiny UNet is chaotic under 1-LSB rounding flips (see parity.py), so images agree only
    # loosely; the per-call parity is tested in test_export_onnx.py
    for d, tol in ((tmp_path / "qdq", 0.5), (tmp_path / "int8", 0.5)):
        eng = load_engine(d)
        img = ddim_sample(eng, q.scheduler_config, (1, 16, 16), 4, cfg)
        rel = float((img - ref).norm() / ref.norm())
        print(d.name, "image rel L2 vs PyTorch fake-quant", rel)
        assert img.shape == ref.shape and torch.isfinite(img).all() and rel < tol


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engine_runs_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible): TensorRT engines are built and run on users' GPU machines")
    if not tensorrt_available():
        pytest.skip("needs the full TensorRT Python package (pip install .[tensorrt]); not installable here")
    from pqcad_export.export.onnx import export_unet

    q = make_quantized("w8a8")
    res = export_unet(q.unet, tmp_path / "unet.onnx")
    info = build_engine(res.path, tmp_path / "trt", "tensorrt")
    eng = load_engine(tmp_path / "trt")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        ref = q(x, t)
    y = eng(x.cuda(), t.cuda()).cpu()
    assert float((y - ref).norm() / ref.norm()) < 0.05
    lat = eng.latency(batch=2)
    assert lat.timer == "cuda_event" and lat.median_ms > 0
    assert info.layers and info.precision["quantized_layers"]["float"] == 0
