"""Any diffusers UNet end to end (issue 24, item 5): a UNet2DConditionModel through every stage with a --cond file
and with the labelled default, and a scheduler with `leading` timestep spacing (diffusers' DDIMScheduler default)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import TINY, _save, make_tiny_unet
from pqcad_export.cli import main
from pqcad_export.pipeline.build import run_build
from test_pipeline import tiny_cfg


@pytest.fixture(scope="module")
def cond_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("cond") / "prompts.safetensors"
    save_file({"encoder_hidden_states": torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(9))}, str(f))
    return f


@pytest.fixture(scope="module")
def cond_run(tiny_cond_unet_dir, cond_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cond_run") / "w8a8"
    summary = run_build(tiny_cfg(tiny_cond_unet_dir, out, bits="w8a8", cond=str(cond_file)))
    return out, summary


def test_conditional_build_runs_every_stage_with_the_cond_file(cond_run, cond_file):
    out, summary = cond_run
    run = json.loads((out / "run.json").read_text())
    assert all(run["stages"][s]["status"] == "done" for s in ("calib", "quant", "student", "export", "engine",
                                                                "report"))
    assert run["conditioning"]["source"] == "file" and run["conditioning"]["shape"] == [3, 5, 16]
    from calibration.storage import open_set

    cqc = open_set(out / "calib", "c_qc").load_all()
    assert cqc["encoder_hidden_states"].shape[1:] == (5, 16)
    log = json.loads((out / "student/cad_log.json").read_text())
    assert log["eval_after"]["loss"] == log["eval_after"]["loss"]  # finite, CAD ran with conditioning
    assert json.loads((out / "export/lint.json").read_text())["ok"]
    import onnx

    shape = [d.dim_value for d in next(i for i in onnx.load(str(out / "export/unet.onnx")).graph.input
                                       if i.name == "encoder_hidden_states").type.tensor_type.shape.dim]
    assert shape[1:] == [5, 16]
    rep = summary["compare"]
    # 2-channel latents: no FID, so the engine ran but its images were not scored (architecture.md honesty rules)
    assert rep["candidates"][0]["status"] == "ran (images not scored)"
    assert any("conditioning: --cond" in n for n in rep["notes"])


def test_compare_of_the_conditional_run_and_its_engine(cond_run, tiny_cond_unet_dir, cond_file, tmp_path):
    out, _ = cond_run
    res = CliRunner().invoke(main, ["compare", "--run", str(out), "--samples", "2", "--batch-size", "2",
                                    "--teacher-steps", "10", "--no-fid", "--quiet", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["compare", "--engine", str(out / "engine"), "--model", str(tiny_cond_unet_dir),
                                    "--cond", str(cond_file), "--steps", "5", "--teacher-steps", "10", "--samples",
                                    "2", "--batch-size", "2", "--no-fid", "--quiet", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "b/compare.json").read_text())
    assert rep["candidates"][0]["status"] == "ran (images not scored)" and "Traceback" not in res.output


def test_engine_of_another_model_is_refused(cond_run, tiny_unet_dir, tiny_cond_unet_dir):
    out, _ = cond_run
    fp = json.loads((out / "engine/engine.json").read_text())["model_fingerprint"]
    assert fp == json.loads((out / "run.json").read_text())["model_fingerprint"]
    other = _save(make_tiny_unet(seed=11), tiny_unet_dir.parent / "other_model")
    res = CliRunner().invoke(main, ["compare", "--engine", str(out / "engine"), "--model", str(other),
                                    "--samples", "2", "--no-fid"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and f"was built from model {fp}" in res.output


def test_conditional_build_without_cond_uses_the_labelled_default(tiny_cond_unet_dir, tmp_path):
    out = tmp_path / "r"
    run_build(tiny_cfg(tiny_cond_unet_dir, out, bits="w8a8", stop_after="student"))
    run = json.loads((out / "run.json").read_text())
    assert run["conditioning"]["source"] == "default" and "default: 16 seeded N(0,1)" in run["conditioning"]["label"]
    assert run["stages"]["student"]["status"] == "done"


def test_leading_spacing_model_builds_on_every_other_teacher_point(tmp_path):
    """diffusers' DDIMScheduler default (leading, steps_offset=1): the student's grid is set to every other point
    of the teacher's actual grid; C_DC lies on it and the student samples on it."""
    from pqcad_export.quantize import load_quantized
    from pqcad_export.sampling import ddim_timesteps

    d = _save(make_tiny_unet(seed=2), tmp_path / "m")
    cfg = json.loads((d / "scheduler_config.json").read_text())
    (d / "scheduler_config.json").write_text(json.dumps({**cfg, "timestep_spacing": "leading", "steps_offset": 1}))
    out = tmp_path / "r"
    no_refs = {**TINY, "compare": {**TINY["compare"], "fp_references": False}}  # this test is about the grids
    summary = run_build(tiny_cfg(d, out, bits="w8a8", no_fid=True, overrides=no_refs))
    teacher = ddim_timesteps({**cfg, "timestep_spacing": "leading", "steps_offset": 1}, 10)
    assert teacher.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    student = load_quantized(out / "student")
    assert ddim_timesteps(student.scheduler_config, 5).tolist() == teacher[0::2].tolist()
    log = json.loads((out / "student/cad_log.json").read_text())
    assert log["student_timesteps"] == teacher[0::2].tolist() and log["cdc"]["rows_off_grid"] == 0
    assert summary["compare"]["candidates"][0]["steps"] == 5
