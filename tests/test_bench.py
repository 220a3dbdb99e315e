"""engines.bench: every (engine, batch, repetition) is timed in its own process, the processes taking turns; the
report carries medians, spread, per-round medians and paired ratios, the CPU ISA and the thread count; a failing
engine is a one-line error; and the `bench` CLI writes the report as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from export_helpers import conv_qdq

from engines.bench import BenchTarget, ratio, ratio_stats, run_bench
from pqcad_export.cli import main


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory):
    import onnx

    p = tmp_path_factory.mktemp("bench") / "conv.onnx"
    onnx.save(conv_qdq(), str(p))
    return p


def test_each_measurement_runs_in_its_own_process(conv_onnx):
    pytest.importorskip("openvino", reason="openvino not installed")
    targets = [BenchTarget("ort", "onnxruntime", str(conv_onnx)), BenchTarget("ov", "openvino", str(conv_onnx))]
    rep = run_bench(targets, [1, 2], reps=2, rounds=3, threads=1, warmup=1, iters=4)
    assert rep["threads"] == 1 and rep["reps"] == 2 and "cpu_isa" in rep and rep["versions"]["openvino"]
    assert {(r["name"], r["batch"]) for r in rep["rows"]} == {(n, b) for n in ("ort", "ov") for b in (1, 2)}
    pids = [p for r in rep["rows"] for p in r["pids"]]
    assert len(pids) == 8 == len(set(pids)) and os.getpid() not in pids  # 2 targets x 2 batches x 2 reps
    for r in rep["rows"]:
        assert len(r["rep_medians_ms"]) == 2 and r["median_ms"] > 0 and r["spread"] >= 0
        assert [len(x) for x in r["round_medians_ms"]] == [3, 3]  # 4 calls over 3 rounds: turns of 2, 1, 1
    assert rep["rows"][0]["precision"] == "int8" and rep["rows"][2]["precision"].startswith("int8+")
    ort2, ov2 = (next(r for r in rep["rows"] if r["name"] == n and r["batch"] == 2) for n in ("ort", "ov"))
    paired = sorted(a / b for x, y in zip(ort2["round_medians_ms"], ov2["round_medians_ms"]) for a, b in zip(x, y))
    assert ratio(rep, "ort", "ov", 2) == pytest.approx((paired[2] + paired[3]) / 2, rel=1e-2)
    st = ratio_stats(rep, "ort", "ov", 2)
    assert st["rounds"] == 6 and st["p25"] <= st["median"] <= st["p75"]
    assert st["p25"] == pytest.approx(float(np.percentile(paired, 25)), rel=1e-2)
    old = {"rows": [{k: v for k, v in r.items() if k != "round_medians_ms"} for r in rep["rows"]]}
    assert ratio(old, "ort", "ov", 2) == pytest.approx(ort2["median_ms"] / ov2["median_ms"], rel=1e-2)


def _children() -> set[int]:
    """Live child processes of this one (Linux /proc)."""
    out = set()
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        out |= {int(x) for x in Path(f"/proc/{os.getpid()}/task/{tid}/children").read_text().split()}
    return out


def test_a_failing_engine_is_one_line_and_leaves_no_process(conv_onnx, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    before = _children()
    with pytest.raises(RuntimeError, match=r"^benchmark of bad at batch 1 failed: .+") as exc:
        run_bench([BenchTarget("ok", "onnxruntime", str(conv_onnx)), BenchTarget("bad", "onnxruntime", str(bad))],
                  [1], reps=1, threads=1, warmup=1, iters=2)
    assert "\n" not in str(exc.value)
    assert _children() <= before


def test_bench_cli_json_and_bad_target(conv_onnx, tmp_path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", "--no-fp", "--target", f"c=onnxruntime:{conv_onnx}", "--batch", "1",
                                  "--reps", "1", "--iters", "2", "--warmup", "1", "--threads", "1",
                                  "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["rows"][0]["name"] == "c" and rep["rows"][0]["median_ms"] > 0
    r = CliRunner().invoke(main, ["bench", "--no-fp", "--target", "nonsense"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["bench", "--no-fp", "--target", f"c=onnxruntime:{conv_onnx}", "--rounds", "0"])
    assert r.exit_code == 2 and "--rounds" in r.output


def test_bench_worker_imports_no_torch():
    """Every bench measurement is a fresh process: importing torch there cost ~2 s per engine and batch."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = "import sys, engines.bench, engines.openvino, engines.onnxruntime; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr[-1000:])
