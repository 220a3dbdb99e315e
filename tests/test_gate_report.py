"""Quality gates (exit codes 2 and 3, compare.json records), the 80-column summary, the report pictures, and the
new quality keys of a real compare on a tiny run."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

from pqcad_export.cli import main
from pqcad_export.pipeline.gate import GATE_METRICS, parse_gate

QUALITY_KEYS = ("kid", "kid_std", "kid_to_fp32", "psnr_to_fp32", "ssim_to_fp32")


@pytest.fixture(scope="module")
def scored_run(tiny_build, tmp_path_factory):
    """The session's tiny build (conftest), copied, then `compare --run` with --ref-images and two gates, one
    missed."""
    import shutil

    root = tmp_path_factory.mktemp("gate")
    out = root / "w4a8"
    shutil.copytree(tiny_build[0], out)
    data = np.random.default_rng(0).integers(0, 256, (6, 1, 32, 32), dtype=np.uint8)
    np.save(root / "data.npy", data)
    mp = pytest.MonkeyPatch()
    mp.setenv("PQCAD_CACHE", str(root / "cache"))
    res = CliRunner().invoke(main, ["compare", "--run", str(out), "--samples", "4", "--batch-size", "2",
                                    "--teacher-steps", "10", "--quiet", "--ref-images", str(root / "data.npy"),
                                    "--gate", "ssim_to_fp32>=-1", "--gate", "psnr_to_fp32>=1000"])
    mp.undo()
    return out, res, root


def test_missed_gate_exits_3_after_writing_the_report(scored_run):
    out, res, _ = scored_run
    assert res.exit_code == 3, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: quality gate failed on w4a8-onnxruntime: psnr_to_fp32>=1000 (got ")
    assert "[1 of 2 missed]" in last
    rep = json.loads((out / "report/compare.json").read_text())
    assert rep["gate_verdict"] == "failed"
    gates = {g["gate"]: g for g in rep["gates"]}
    assert gates["ssim_to_fp32>=-1"]["passed"] is True and gates["psnr_to_fp32>=1000"]["passed"] is False
    assert gates["psnr_to_fp32>=1000"]["value"] == rep["candidates"][0]["psnr_to_fp32"]
    for rel in ("compare.png", "samples.png"):
        assert (out / "report" / rel).stat().st_size > 0


def test_compare_reports_kid_and_paired_metrics(scored_run):
    out, _, root = scored_run
    rep = json.loads((out / "report/compare.json").read_text())
    c, ref = rep["candidates"][0], rep["reference"]
    for k in QUALITY_KEYS:
        assert isinstance(c[k], float), (k, c[k])
    assert c["fid"] is not None and ref["fid"] is not None  # from --ref-images
    assert c["kid_std"] >= 0 and 0 < c["psnr_to_fp32"] <= 120 and -1 <= c["ssim_to_fp32"] <= 1
    assert ref["kid_to_fp32"] == 0.0 and ref["ssim_to_fp32"] == 1.0 and isinstance(ref["kid"], float)
    assert rep["quality"]["reference_data"]["count"] == 6
    assert list((root / "cache" / "fid").glob("refstats-*/refstats.json")), "statistics were not cached"


def _fake_build(monkeypatch, out):
    summary = {"run": str(out), "stages": [{"stage": "report", "status": "done", "seconds": 1.0,
                                            "path": str(out / "report")}], "seconds": 1.0,
               "compare": json.loads((out / "report/compare.json").read_text())}
    monkeypatch.setattr("pqcad_export.pipeline.build.run_build", lambda cfg: dict(summary))


def test_build_gate_pass_and_fail(scored_run, monkeypatch):
    out, _, _ = scored_run
    _fake_build(monkeypatch, out)
    ok = CliRunner().invoke(main, ["build", "--bits", "w4a8", "--out", str(out), "--gate", "ssim_to_fp32>=-1"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip().splitlines()[-1] == "quality gate passed: ssim_to_fp32>=-1"
    assert json.loads((out / "report/compare.json").read_text())["gate_verdict"] == "passed"
    bad = CliRunner().invoke(main, ["build", "--bits", "w4a8", "--out", str(out), "--gate", "kid_to_fp32<=-1"])
    assert bad.exit_code == 3 and "quality gate failed" in bad.output.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, msg", [
    (["--gate", "psnr_to_fp32>30"], "malformed --gate"),
    (["--gate", "psnr_to_fp32>=thirty"], "malformed --gate"),
    (["--gate", "accuracy>=0.9"], "unknown metric 'accuracy'"),
    (["--no-fid", "--gate", "fid<=10"], "--no-fid"),
])
@pytest.mark.parametrize("cmd", ["build", "compare"])
def test_bad_gate_refused_before_any_work(cmd, argv, msg, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr("pqcad_export.pipeline.build.run_build", boom)
    monkeypatch.setattr("pqcad_export.model_io.load_model", boom)
    base = ["build", "--bits", "w4a8"] if cmd == "build" else ["compare", "--run", str(tmp_path / "r")]
    res = CliRunner().invoke(main, [*base, *argv, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("error: ") and msg in res.output
    assert not (tmp_path / "o").exists()


def test_gate_parsing():
    g = parse_gate(" kid_to_fp32 <= 2e-3 ")
    assert (g.metric, g.op.value, g.threshold, g.text) == ("kid_to_fp32", "<=", 0.002, "kid_to_fp32<=0.002")
    assert g.passes(0.001) and not g.passes(0.01) and not g.passes(None) and not g.passes(float("nan"))
    assert parse_gate("psnr_to_fp32>=30").passes(30.0) and set(("fid", "ms_per_image")) <= set(GATE_METRICS)


def _render(summary) -> str:
    from rich.console import Console

    from pqcad_export.pipeline.summary import print_summary

    buf = io.StringIO()
    print_summary(summary, console=Console(width=80, file=buf, force_terminal=False, color_system=None))
    return buf.getvalue()


def test_summary_fits_80_columns_with_references(scored_run):
    out, _, _ = scored_run
    rep = json.loads((out / "report/compare.json").read_text())
    rep["references"] = [
        {"name": "onnxruntime-fp32", "backend": "onnxruntime", "precision": "fp32", "steps": 100,
         "unet_ms_per_call": 12.5, "ms_per_image": 1300.25, "fid": 5.1, "fid_to_fp32": 0.2},
        {"name": "openvino-bf16-with-a-rather-long-name", "backend": "openvino", "precision": "bf16 (CPU default)",
         "steps": 50, "unet_ms_per_call": 6.0, "ms_per_image": 320.0, "fid": None, "fid_to_fp32": 3.3},
    ]
    summary = {"run": str(out) + "/a/very/long/path/segment" * 3, "seconds": 12.3, "compare": rep,
               "report_dir": str(out / "report"),
               "stages": [{"stage": s, "status": "done", "seconds": 1.5, "path": str(out / s) + "/x" * 20}
                          for s in ("calib", "quant", "student", "export", "engine", "report")]}
    text = _render(summary)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text and "..." not in text
    for name in ("fp32-teacher", "w4a8-onnxruntime", "onnxruntime-fp32", "openvino-bf16-with-a-rather-long-name",
                 "ms/image", "PSNR", "SSIM", "KID", f"gate {rep['gates'][-1]['gate']}: "):
        assert name in text, name
    # the speed-up names the FP reference it is measured against (the fastest one, rarely PyTorch FP32)
    c = next(e for e in rep["candidates"] if e.get("speedup_vs_reference"))
    assert f"× {c['speedup_reference']}'s speed" in text.replace("\n", " ") and "FP32's speed" not in text
    del rep["references"]
    assert "FP reference;" not in _render({"run": "r", "stages": [], "compare": rep})  # no reference blocks


def test_speed_quality_chart_and_marked_grid(tmp_path):
    from PIL import Image

    from pqcad_export.pipeline.report_png import plot_report, quality_axis, samples_png

    g = np.random.default_rng(0)
    ref = g.integers(0, 256, (16, 1, 8, 8), dtype=np.uint8)
    cand = ref.copy()
    cand[3] = 255 - cand[3]
    cand[9] = 0
    cand[5, 0, 0, 0] ^= 1  # a 1-LSB change: must rank last
    mse = ((cand.astype(float) - ref) / 255) ** 2
    marked = samples_png({"reference": ref, "w4a8": cand}, tmp_path / "s.png",
                         {"w4a8": mse.reshape(16, -1).mean(1)}, k=2)
    assert marked["reference"] == [] and sorted(marked["w4a8"]) == [3, 9]
    img = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    # the frame of candidate column 3 (row 1): canvas x = 130 + 3 + 3 * 11 - 1, y = 3 + 11 - 1, scaled by 2
    assert tuple(img[2 * (3 + 11 - 1), 2 * (130 + 3 + 3 * 11 - 1) + 4]) == (220, 30, 30)
    assert tuple(img[2 * (3 + 11 - 1), 2 * (130 + 3 + 5 * 11 - 1) + 4]) == (255, 255, 255)  # column 5 unframed
    rep = {"device": "cpu", "samples": 16,
           "reference": {"name": "fp32", "steps": 100, "ms_per_image": 100.0, "fid_to_fp32": 0.0},
           "candidates": [{"name": "w4a8", "steps": 50, "ms_per_image": 40.0, "fid_to_fp32": 7.0,
                           "kid_to_fp32": 0.01, "kid_to_fp32_std": 0.002}],
           "references": [{"name": "ov-bf16", "steps": 100, "ms_per_image": 60.0, "fid_to_fp32": 1.0}]}
    assert quality_axis(rep) == "kid_to_fp32"
    plot_report(rep, tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size[0] >= 1200
    rep["candidates"][0]["kid_to_fp32"] = None
    assert quality_axis(rep) == "fid_to_fp32"
