"""End to end `build` on a tiny UNet, resume after a kill during quantization, and the bad-input cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from click.testing import CliRunner

from conftest import TINY, tiny_cfg  # noqa: F401  (TINY, tiny_cfg: imported from here by other test modules)
from pqcad_export.cli import main
from pqcad_export.pipeline.build import BuildConfig, run_build

REQUIRED = ("name", "backend", "precision", "steps", "unet_ms_per_call", "ms_per_image", "fid", "fid_to_fp32",
            "model_bytes")


@pytest.fixture(scope="module")
def built(tiny_build):
    return tiny_build  # conftest: built once per session, also read by test_gate_report (on a copy)


def test_build_end_to_end_artifacts(built):
    out, summary = built
    for rel in ("run.json", "calib/c_qc/manifest.json", "calib/c_dc/manifest.json", "quant/quant.json",
                "student/quant.json", "export/unet.onnx", "export/lint.json", "export/parity.json",
                "engine/engine.json", "report/compare.json", "report/compare.png", "report/samples.png"):
        assert (out / rel).exists(), rel
    run = json.loads((out / "run.json").read_text())
    assert all(run["stages"][s]["status"] == "done" for s in ("calib", "quant", "student", "export", "engine",
                                                                "report"))
    assert run["model_fingerprint"] and "torch" in run["versions"]
    student = json.loads((out / "student/quant.json").read_text())
    assert student["meta"]["steps"] == 5 if "meta" in student else student["steps"] == 5


def test_compare_json_contract(built):
    out, _ = built
    rep = json.loads((out / "report/compare.json").read_text())
    for key in ("samples", "device", "fid_features", "seed", "reference", "candidates", "notes"):
        assert key in rep
    assert rep["samples"] == 4 and rep["seed"] == 0
    for k in REQUIRED:
        assert k in rep["reference"]
    assert rep["reference"]["steps"] == 10 and rep["reference"]["fid_to_fp32"] == 0.0
    assert rep["reference"]["unet_ms_per_call"] > 0 and rep["reference"]["ms_per_image"] > 0
    # FID vs the dataset needs cached reference statistics: null with a note, never invented
    if rep["reference"]["fid"] is None:
        assert any(n.startswith("fid") for n in rep["notes"])
    ort = [c for c in rep["candidates"] if c["backend"] == "onnxruntime"]
    assert ort, "the ONNX Runtime engine must be a candidate"
    c = ort[0]
    for k in (*REQUIRED, "speedup_vs_reference"):
        assert k in c
    assert c["status"] == "executed" and c["steps"] == 5
    assert c["ms_per_image"] > 0 and c["unet_ms_per_call"] > 0 and c["model_bytes"] > 0
    assert c["fid_to_fp32"] is not None and c["fid_to_fp32"] >= 0


def test_rerun_skips_unchanged_stages(built, tiny_attn_unet_dir):
    out, _ = built
    before = json.loads((out / "run.json").read_text())["stages"]
    onnx_mtime = (out / "export/unet.onnx").stat().st_mtime_ns
    run_build(tiny_cfg(tiny_attn_unet_dir, out))
    after = json.loads((out / "run.json").read_text())["stages"]
    assert (out / "export/unet.onnx").stat().st_mtime_ns == onnx_mtime
    for s in ("calib", "quant", "student", "export", "engine", "report"):
        assert after[s]["key"] == before[s]["key"] and after[s]["started"] == before[s]["started"]


def test_kd_teacher_fp_retrains_only_the_student(built, tiny_attn_unet_dir, tmp_path):
    """`build --kd-teacher fp` reaches CAD (the log says whose steps it copied) and invalidates the student stage
    and those after it, not the calibration set or the quantized teacher."""
    import shutil

    out, _ = built
    run = tmp_path / "fp"
    shutil.copytree(out, run)
    before = json.loads((run / "run.json").read_text())["stages"]
    run_build(tiny_cfg(tiny_attn_unet_dir, run, kd_teacher="fp", stop_after="student"))
    after = json.loads((run / "run.json").read_text())["stages"]
    for s in ("calib", "quant"):
        assert after[s]["key"] == before[s]["key"] and after[s]["started"] == before[s]["started"]
    assert after["student"]["key"] != before["student"]["key"]
    assert json.loads((run / "student/cad_log.json").read_text())["config"]["kd_teacher"] == "fp"
    assert json.loads((out / "student/cad_log.json").read_text())["config"]["kd_teacher"] == "quantized"


# Stage keys computed by the code before BuildConfig grouped its options per stage (commit 733bf80), for a model
# fingerprint fixed to "fixed-fingerprint": a run directory made then must resume now.
KEYS_BEFORE_GROUPING = {
    "defaults": ["b327a5fdbcfd463f", "491ecdee39a527d0", "ed12a72de231b06c", "4cb61b9e7f5f334e", "3dc4261e578a12f3",
                 "3ec4874fcad69f0e"],
    "pcr": ["9e58d69343312a82", "3e55cbb3e90e5c9a", "ef2d1e9ff71a5106", "dcd263ee99b5c0ac", "4f92d53ab372e9cb",
            "fa782e8db78c2bba"],
    "options": ["b327a5fdbcfd463f", "c53301debb65aefa", "4366204cea94aecd", "b284fcf15d19c024", "9bbb855e1bf68f66",
                "dcaa2ee97e43c7d7"],
}


def test_stage_keys_unchanged_by_the_option_grouping(tiny_unet_dir, tmp_path, monkeypatch):
    """Every stage key of the same options (defaults, PCR calibration, every stage option set) is the key the flat
    BuildConfig gave; the stages themselves are not run (each counts as done)."""
    import pqcad_export.pipeline.build as pbuild
    from pqcad_export.pipeline.run_dir import RunDir, stage_key

    seen: list[str] = []
    monkeypatch.setattr(pbuild, "stage_key", lambda *parts: seen.append(stage_key(*parts)) or seen[-1])
    monkeypatch.setattr(RunDir, "is_done", lambda self, *a, **k: True)
    load = pbuild.load_teacher

    def fixed(*a, **k):
        t = load(*a, **k)
        t.fingerprint = "fixed-fingerprint"
        return t

    monkeypatch.setattr(pbuild, "load_teacher", fixed)
    variants = {
        "defaults": {"overrides": {}},
        "pcr": {"calib_strategy": "pcr", "overrides": {"quant": {"iters": 6, "act_iters": 2}}},
        "options": {"method": "direct", "recon_loss": "fbr", "qdrop": 0.5, "mixed_precision": "off",
                    "calib_loss": "swd", "lam": 0.5, "kd_teacher": "fp", "samples": 7, "latency_batch": 2,
                    "relax_frac": 0.2, "include_torch_student": True,
                    "overrides": {"quant": {"iters": 6}, "student": {"iters": 3}}},
    }
    for name, kw in variants.items():
        seen.clear()
        run_build(tiny_cfg(tiny_unet_dir, tmp_path / name, **kw))
        assert seen == KEYS_BEFORE_GROUPING[name], name


_KILL_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)  # same as the in-process runs (conftest): float reductions must match bit for bit
    from pqcad_export.pipeline.build import BuildConfig, run_build
    cfg = BuildConfig.flat(**json.loads(sys.argv[1]))
    run_build(cfg)
""")


@pytest.mark.slow
def test_kill_during_quantization_then_resume(tiny_attn_unet_dir, tmp_path):
    """SIGKILL the build once two blocks are checkpointed; the rerun keeps them and ends identical."""
    slow = {**TINY, "quant": {**TINY["quant"], "iters": 150}}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = dict(bits="w4a8", model=str(tiny_attn_unet_dir), out=str(killed), teacher_steps=10, student_steps=5,
                backend="onnxruntime", samples=4, compare_batch=2, quiet=True, overrides=slow, no_fid=True)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, json.dumps(args)], env={**os.environ},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "quant" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(ckpt.glob("unit_*.safetensors"))) < 2:
        time.sleep(0.02)
        assert proc.poll() is None, "build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = json.loads((ckpt / "progress.json").read_text())["done"]
    assert len(finished) >= 1 and not (killed / "quant" / "quant.json").exists()
    files = sorted(ckpt.glob("unit_*.safetensors"))[:len(finished)]  # blocks recorded as finished
    done = {p.name: p.stat().st_mtime_ns for p in files}

    run_build(BuildConfig.flat(**args))
    for name, mtime in done.items():  # finished blocks were not recomputed
        assert (ckpt / name).stat().st_mtime_ns == mtime, name
    run_build(BuildConfig.flat(**{**args, "out": str(clean)}))
    from safetensors.torch import load_file

    for rel in ("quant/quantized.safetensors", "student/quantized.safetensors"):
        a, b = load_file(str(killed / rel)), load_file(str(clean / rel))  # header key order may vary, data not
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    import onnx

    ga, gb = (onnx.load(str(d / "export/unet.onnx")).graph for d in (killed, clean))
    assert ga.SerializeToString() == gb.SerializeToString()  # metadata (source paths) may differ, the graph not


@pytest.mark.parametrize("argv,msg", [
    (["build", "--bits", "w3x8"], "unsupported --bits"),
    (["build", "--bits", "w4a8", "--backend", "cuda-magic"], "unknown backend"),
    (["build", "--bits", "w4a8", "--model", "/nonexistent/model"], "does not exist"),
    (["build", "--bits", "w4a8", "--quant-iters", "-5"], "--quant-iters must be >= 0"),
])
def test_bad_input_one_line(argv, msg, tmp_path):
    res = CliRunner().invoke(main, [*argv, "--out", str(tmp_path / "r")])
    assert res.exit_code in (1, 2)
    assert msg in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_budget_options_reach_the_stage_configs(monkeypatch, tmp_path):
    """--quant-iters / --act-iters / --distill-iters become the quant and student stage overrides (the preset's
    algorithm with a stated budget); unset ones stay the preset's."""
    import pqcad_export.pipeline.build as pbuild
    import pqcad_export.pipeline.summary as psummary

    seen = []
    monkeypatch.setattr(pbuild, "run_build", lambda cfg: seen.append(cfg) or {})
    monkeypatch.setattr(psummary, "print_summary", lambda summary: None)
    res = CliRunner().invoke(main, ["build", "--bits", "w4a8", "--preset", "paper", "--quant-iters", "800",
                                    "--distill-iters", "1000", "--out", str(tmp_path / "r"), "--method", "direct",
                                    "--calib-strategy", "tdac", "--calib-loss", "swd", "--samples", "7"])
    assert res.exit_code == 0, res.output
    assert seen[0].overrides() == {"quant": {"iters": 800}, "student": {"iters": 1000}}
    c = seen[0]  # each flag lands in its stage's group
    assert (c.calib.strategy, c.quant.method, c.distill.calib_loss, c.compare.samples) == ("tdac", "direct", "swd", 7)
    from pqcad_export.quantize import ReconConfig

    rcfg = ReconConfig.preset("paper", **seen[0].overrides()["quant"])
    assert (rcfg.iters, rcfg.act_iters) == (800, ReconConfig.preset("paper").act_iters)


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_silences_the_block_progress_without_changing_the_quant_key(quiet, tiny_unet_dir, tmp_path,
                                                                           monkeypatch):
    import pqcad_export.quantize.stage as quantize  # the quantize stage every caller runs

    seen = []

    def fake_quantize(teacher, batches, bits, method, rcfg, device, **kw):
        seen.append(rcfg)
        raise KeyboardInterrupt  # stop the build here; the stage is recorded as failed

    monkeypatch.setattr(quantize, "quantize_model", fake_quantize)
    with pytest.raises(KeyboardInterrupt):
        run_build(tiny_cfg(tiny_unet_dir, tmp_path / "r", quiet=quiet))
    assert seen[0].progress is (not quiet)
    key = json.loads((tmp_path / "r" / "run.json").read_text())["stages"]["quant"]["key"]
    monkeypatch.setattr(quantize, "quantize_model", fake_quantize)
    with pytest.raises(KeyboardInterrupt):
        run_build(tiny_cfg(tiny_unet_dir, tmp_path / "r", quiet=not quiet))
    assert json.loads((tmp_path / "r" / "run.json").read_text())["stages"]["quant"]["key"] == key


def test_tensorrt_requested_but_absent(tmp_path):
    pytest.importorskip("pqcad_export")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here; the absent-TensorRT error cannot be exercised")
    except ImportError:
        pass
    res = CliRunner().invoke(main, ["build", "--bits", "w4a8", "--backend", "tensorrt", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "tensorrt" in res.output.lower() and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


def test_run_dir_of_a_different_model(built, tiny_unet_dir):
    out, _ = built
    res = CliRunner().invoke(main, ["build", "--bits", "w4a8", "--model", str(tiny_unet_dir), "--out", str(out)])
    assert res.exit_code == 1 and "different model" in res.output
    assert (out / "report/compare.json").exists()  # nothing lost


def test_a_stage_override_may_name_a_typed_option():
    """overrides win over the typed options of their stage (a key in both once, not a TypeError)."""
    from pqcad_export.bits import parse_bits
    from pqcad_export.pipeline.stage_configs import stage_configs

    cfg = BuildConfig.flat(samples=7, overrides={"compare": {"batch_size": 3, "samples": 5},
                                                 "student": {"lam": 0.5}, "calib": {"seed": 4}})
    s = stage_configs(cfg, parse_bits("w4a8"))
    assert (s.compare.batch_size, s.compare.samples, s.student.lam, s.calib.seed) == (3, 5, 0.5, 4)
