"""OpenVINO engine: a tiny W8A8 export compiles unchanged with INT8 convolutions (read from the compiled model's
runtime info), matches the PyTorch fake-quant model like ONNX Runtime does, counts float layers of a mixed graph
as float, and is never labelled executed by building alone. Also: no shipped ONNX file carries dead initializers,
and the split-conv slice folding keeps the math."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import make_quantized

pytest.importorskip("openvino", reason="openvino not installed (pip install openvino)")

from engines import build_engine, load_engine  # noqa: E402
from engines.bench import ratio  # noqa: E402
from engines.openvino import OvConfig, OvEngine, build_ov_engine  # noqa: E402
from pqcad_export.export.graph_cost import dead_initializers, fold_concat_slices  # noqa: E402
from pqcad_export.export.onnx import export_unet  # noqa: E402


@pytest.fixture(scope="module")
def w8(tmp_path_factory):
    q = make_quantized("w8a8")
    d = tmp_path_factory.mktemp("ov_w8a8")
    return q, export_unet(q.unet, d / "unet.onnx").path


def _rel(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)


def test_openvino_runs_int8_convolutions_and_manifest(w8, tmp_path):
    _, path = w8
    info = build_engine(path, tmp_path / "ov", "openvino")
    d = json.loads((tmp_path / "ov" / "engine.json").read_text())
    assert d["backend"] == "openvino" and d["version"] and d["executed"] is False
    prec = d["precision"]
    assert prec["inference_precision"] in ("bf16", "f32", "f16")
    assert prec["compute_layers"].get("Convolution:u8", 0) + prec["compute_layers"].get("Convolution:i8", 0) >= 5
    assert prec["n_int8_layers"] == sum(1 for L in d["layers"] if L["precision"] in ("u8", "i8"))
    assert prec["n_int8_layers"] + prec["n_float_layers"] == len(d["layers"])
    assert "cpu_isa" in prec and info.notes[0].startswith("backend openvino")
    # the shipped copy is the export, unchanged
    assert (tmp_path / "ov" / "model.onnx").read_bytes() == path.read_bytes()
    eng = load_engine(tmp_path / "ov")
    assert isinstance(eng, OvEngine)
    lat = eng.latency(batch=2, warmup=1, iters=3)
    assert lat.iters == 3 and lat.median_ms > 0


def test_openvino_matches_pytorch_like_ort(w8, tmp_path):
    """OpenVINO is as close to the PyTorch fake-quant model as ONNX Runtime is: as many samples within 1e-3
    relative L2 (one fewer allowed) and a worst sample no further than 1.5x ORT's worst (a 1-LSB rounding flip at
    some QuantizeLinear moves either engine off PyTorch on a few samples: see export/parity.py), with the float parts at f32 (bf16, the CPU default, is a different
    precision, not a parity question)."""
    from engines.onnxruntime import OrtConfig, make_session

    q, path = w8
    eng = OvEngine.from_onnx(path, OvConfig(precision="f32"), out_dir=tmp_path / "ov32")
    assert eng.inference_precision == "f32"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 16, 16, generator=g)
    t = torch.tensor([999, 999, 500, 500, 1, 1])
    with torch.no_grad():
        ref = q(x, t).numpy()
    ov = eng(x, t).numpy()
    ort = make_session(path, OrtConfig(mode="qdq", provider="cpu")).run(
        None, {"sample": x.numpy(), "timestep": t.float().numpy()})[0]
    r_ov, r_ort = _rel(ov, ref), _rel(ort, ref)
    assert np.isfinite(ov).all()
    assert (r_ov <= 1e-3).sum() >= (r_ort <= 1e-3).sum() - 1 and (r_ov <= 1e-3).sum() >= 2, (r_ov, r_ort)
    assert r_ov.max() <= max(1e-3, 1.5 * r_ort.max()), (r_ov, r_ort)
    assert (_rel(ov, ort) <= 1e-3).sum() >= len(r_ov) // 2, _rel(ov, ort)


def test_float_layer_in_int8_graph_counts_as_float(w8, tmp_path):
    """A mixed-precision graph: one quantized conv loses its activation Q/DQ -> OpenVINO runs it in float and
    engine.json says so (from runtimePrecision, not from the graph)."""
    _, path = w8
    m = onnx.load(str(path))
    prod = {o: n for n in m.graph.node for o in n.output}
    conv = next(n for n in m.graph.node if n.op_type == "Conv" and "resnets.0/conv2" in n.name)
    dq = prod[conv.input[0]]
    qn = prod[dq.input[0]]
    assert dq.op_type == "DequantizeLinear" and qn.op_type == "QuantizeLinear"
    conv.input[0] = qn.input[0]  # the float activation feeds the conv directly
    from pqcad_export.export.graph_cost import remove_dead_initializers

    keep = [n for n in m.graph.node if n is not dq and n is not qn]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    remove_dead_initializers(m)
    p = tmp_path / "mixed.onnx"
    onnx.save(m, str(p))
    base = build_ov_engine(path, tmp_path / "a").precision
    mixed = build_ov_engine(p, tmp_path / "b").precision
    assert mixed["n_float_layers"] == base["n_float_layers"] + 1
    assert mixed["n_int8_layers"] == base["n_int8_layers"] - 1


def test_shipped_onnx_files_have_no_dead_initializers(w8, tmp_path):
    _, path = w8
    assert dead_initializers(onnx.load(str(path))) == []
    build_engine(path, tmp_path / "ort", "onnxruntime")
    assert dead_initializers(onnx.load(str(tmp_path / "ort" / "model.onnx"))) == []
    m = onnx.load(str(path))  # the check itself sees one
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "orphan"))
    assert dead_initializers(m) == ["orphan"]


def test_split_conv_slices_fold_exactly(tmp_path):
    from engines.onnxruntime import OrtConfig, make_session

    q = make_quantized("w8a8")
    res = export_unet(q.unet, tmp_path / "u.onnx")
    m = onnx.load(str(res.path))
    assert not any(n.op_type == "Slice" and "conv_shortcut" in n.name for n in m.graph.node)  # folded on export
    assert fold_concat_slices(m) == 0
    feeds = {"sample": np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32),
             "timestep": np.array([10.0, 900.0], np.float32)}
    got = make_session(m, OrtConfig(mode="qdq", provider="cpu")).run(None, feeds)[0]
    with torch.no_grad():
        ref = q(torch.from_numpy(feeds["sample"]), torch.tensor([10, 900])).numpy()
    assert np.median(_rel(got, ref)) < 1e-3


@pytest.mark.parametrize("no_fid", [True, False])
def test_compare_references_and_executed_label(w8, tiny_attn_unet_dir, tmp_path, no_fid):
    """compare.json lists the FP references (PyTorch, ORT FP32, OpenVINO with the precision it really ran) and the
    headline speed-up against the fastest of them; the OpenVINO candidate is "executed" only with scored images."""
    from pqcad_export.model_io import load_model
    from pqcad_export.pipeline.compare import Candidate, CompareConfig, run_compare

    _, path = w8
    teacher = load_model(str(tiny_attn_unet_dir))
    build_engine(path, tmp_path / "ov", "openvino")
    eng = load_engine(tmp_path / "ov")
    cand = Candidate(name="w8a8-openvino", backend="openvino", precision="w8a8", steps=2, unet=eng, model_bytes=1,
                     scheduler_config=teacher.scheduler_config, extra={"engine_dir": str(tmp_path / "ov")})
    cfg = CompareConfig(samples=4, batch_size=2, teacher_steps=4, image_runs=1, latency_iters=2, warmup=1,
                        no_fid=no_fid)
    rep = run_compare(teacher, [cand], tmp_path / "report", cfg, quiet=True)
    assert json.loads((tmp_path / "report" / "compare.json").read_text())["references"] == rep["references"]
    refs = {r["name"]: r for r in rep["references"]}
    assert set(refs) == {"fp32-teacher", "fp32-onnxruntime", "fp-openvino"}
    assert refs["fp32-onnxruntime"]["precision"] == "fp32" and refs["fp32-onnxruntime"]["backend"] == "onnxruntime"
    ov_ref = refs["fp-openvino"]
    assert ov_ref["precision"] == load_engine(ov_ref["engine_dir"]).inference_precision
    for r in refs.values():
        assert r["steps"] == 4 and r["unet_ms_per_call"] > 0 and r["ms_per_image"] > 0
    assert ov_ref["fid_to_fp32"] is None and ov_ref["notes"]  # not sampled: null with a note
    c = rep["candidates"][0]
    best = min(refs.values(), key=lambda r: r["ms_per_image"])
    assert c["speedup_reference"] == rep["speedup_reference"] == best["name"]
    assert c["speedup_vs_reference"] == pytest.approx(best["ms_per_image"] / c["ms_per_image"], rel=1e-2)
    assert c["speedup_vs_pytorch_fp32"] > 0
    # per call: the candidate and both FP engines took turns in one run, each in its own process
    run = {r["name"]: r for r in rep["unet_call_run"]["rows"]}
    assert set(run) == {"w8a8-openvino", "fp32-onnxruntime", "fp-openvino"}
    assert len({r["pids"][0] for r in run.values()}) == 3 and os.getpid() not in {r["pids"][0] for r in run.values()}
    for name, r in run.items():
        assert r["median_ms"] == pytest.approx((refs.get(name) or c)["unet_ms_per_call"], rel=1e-3)
    if best["name"] in run:
        assert c["unet_speedup_vs_reference"] == ratio(rep["unet_call_run"], best["name"], c["name"], 1)
    if no_fid:
        assert c["status"] != "executed" and c["fid_to_fp32"] is None
    else:
        assert c["status"] == "executed" and c["fid_to_fp32"] is not None


def test_time_by_part_finds_the_convolutions_and_norms(w8):
    """research.ov_time_by_part (the RESULTS table of where an OpenVINO call spends its time) attributes the tiny
    export's runtime nodes to UNet parts: its convolutions and GroupNorms both take time."""
    from research.ov_time_by_part import PARTS, profile

    _, path = w8
    parts = profile(str(path), 2, 1, 2)
    assert set(parts) <= set(PARTS) and parts["conv"] > 0 and parts["groupnorm"] > 0


def test_auto_on_cpu_keeps_the_measured_faster_engine(w8, tmp_path):
    from engines import CPU_FASTEST, resolve_backend

    _, path = w8
    assert resolve_backend("auto")[0] == CPU_FASTEST  # no TensorRT here
    info = build_engine(path, tmp_path / "auto", "auto")
    d = json.loads((tmp_path / "auto" / "engine.json").read_text())
    auto = d["options"]["auto"]
    assert set(auto["ms_per_call"]) == {"onnxruntime", "openvino"} and all(v > 0 for v in auto["ms_per_call"].values())
    assert auto["chosen"] == d["backend"] == info.backend == min(auto["ms_per_call"], key=auto["ms_per_call"].get)
    assert "measured faster" in d["notes"][0] and str(auto["batch"]) in auto["reason"]
    assert not [p for p in (tmp_path / "auto").iterdir() if p.name.startswith(".auto_")]  # the loser is gone
    eng = load_engine(tmp_path / "auto")
    y = eng(torch.randn(2, 1, 16, 16), torch.tensor([3, 700]))
    assert y.shape == (2, 1, 16, 16) and torch.isfinite(y).all()


def test_static_batch_engine_matches_dynamic(w8, tmp_path):
    _, path = w8
    dyn = OvEngine.from_onnx(path, OvConfig(precision="f32", static_batch=False), out_dir=tmp_path / "d")
    st = OvEngine.from_onnx(path, OvConfig(precision="f32"), out_dir=tmp_path / "s")  # static: the default
    assert json.loads((tmp_path / "s" / "engine.json").read_text())["options"]["static_batch"] is True
    assert dyn._request(3) is dyn.request and not dyn._static
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 400, 900])
    # other kernels for the static shape: 1-LSB rounding flips at some QuantizeLinear (a few % on a sample, as
    # between ORT and PyTorch), never a different function (a swapped sample or batch layout is ~1.4)
    assert _rel(st(x, t).numpy(), dyn(x, t).numpy()).max() < 0.1
    assert list(st._static) == [3] and st.latency(batch=2, warmup=1, iters=2).iters == 2 and 2 in st._static


def test_sigterm_after_static_engines_were_released_is_a_clean_interrupt(w8, tmp_path):
    """Each Core's CPU plugin swaps the thread's signal stack; released out of order they left a freed one
    installed and the next SIGTERM segfaulted. Run in a child process: a crash must fail this test, not pytest."""
    import subprocess
    import sys

    code = f"""
import gc, os, signal, time, torch
from engines.openvino import OvConfig, OvEngine
x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 400, 900])
dyn = OvEngine.from_onnx({str(w8[1])!r}, OvConfig(precision="f32", static_batch=False), out_dir={str(tmp_path / "d")!r})
st = OvEngine.from_onnx({str(w8[1])!r}, OvConfig(precision="f32", static_batch=True), out_dir={str(tmp_path / "s")!r})
st(x, t); dyn(x, t); st.latency(batch=2, warmup=1, iters=1)
del st, dyn; gc.collect()
def stop(signum, frame): raise KeyboardInterrupt
signal.signal(signal.SIGTERM, stop)
try:
    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)
except KeyboardInterrupt:
    print("interrupted cleanly")
"""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0 and "interrupted cleanly" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_engine_cli_openvino_and_choices_from_the_enum(w8, tmp_path):
    from click.testing import CliRunner

    from engines import BACKENDS, Backend
    from pqcad_export.cli import main

    _, path = w8
    assert "openvino" in BACKENDS == tuple(b.value for b in Backend)
    r = CliRunner().invoke(main, ["engine", "--onnx", str(path), "--out", str(tmp_path / "e"), "--backend",
                                  "openvino", "--ov-precision", "f32"])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "e" / "engine.json").read_text())
    assert d["precision"]["inference_precision"] == "f32" and d["options"]["precision"] == "f32"
    r = CliRunner().invoke(main, ["engine", "--onnx", str(path), "--out", str(tmp_path / "x"), "--backend", "tvm"])
    assert r.exit_code == 2
