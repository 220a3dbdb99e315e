"""`pqcad-export distill` on a tiny quantized UNet: success, one-line failures, usage errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pqcad_export.cli import main
from test_distill_cad import one_thread, setup  # noqa: F401  (module-scoped fixtures)


def test_cli_distill(setup, tmp_path):
    r = CliRunner().invoke(main, ["distill", "--quantized", str(setup["quant"]), "--calib", str(setup["calib"]),
                                  "--out", str(tmp_path / "s"), "--iters", "2", "--batch-size", "2",
                                  "--calib-loss", "jsd", "--lambda", "0.5", "--kd-weighting", "snr",
                                  "--model", str(setup["model"]), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "50 steps" in r.output
    assert json.loads((tmp_path / "s" / "quant.json").read_text())["steps"] == 50
    assert json.loads((tmp_path / "s" / "cad_log.json").read_text())["config"]["kd_weighting"] == "snr"
    r = CliRunner().invoke(main, ["distill", "--quantized", str(setup["quant"]), "--calib",
                                  str(tmp_path / "missing"), "--out", str(tmp_path / "t")])
    assert r.exit_code == 1 and r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["distill", "--quantized", str(setup["quant"]), "--calib", str(setup["calib"]),
                                  "--out", str(tmp_path / "u"), "--lambda", "-1"])
    assert r.exit_code == 2, r.output


def test_cli_distill_kd_teacher_fp(setup, tmp_path):
    base = ["distill", "--quantized", str(setup["quant"]), "--calib", str(setup["calib"]), "--iters", "2",
            "--batch-size", "2", "--kd-teacher", "fp", "--quiet"]
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "s"), "--model", str(setup["model"])])
    assert r.exit_code == 0, r.output
    log = json.loads((tmp_path / "s" / "cad_log.json").read_text())
    assert log["config"]["kd_teacher"] == "fp"
    assert json.loads((tmp_path / "s" / "quant.json").read_text())["distillation"]["kd_teacher"] == "fp"
    # the tiny teacher is not the built-in model: without --model there is no FP target, said before any work
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "t")])
    assert r.exit_code == 1 and "kd-teacher fp needs the FP model" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "t" / "cad_train_images.safetensors").exists()


def test_cli_distill_cond_file_on_an_unconditional_teacher_is_usage(setup, tmp_path):
    """`distill --cond` reads the file against the quantized UNet (distill.run_distill): an unconditional one is
    bad usage, refused in one line before any training image is drawn."""
    import torch
    from safetensors.torch import save_file

    f = tmp_path / "prompts.safetensors"
    save_file({"encoder_hidden_states": torch.zeros(2, 4, 16)}, str(f))
    r = CliRunner().invoke(main, ["distill", "--quantized", str(setup["quant"]), "--calib", str(setup["calib"]),
                                  "--out", str(tmp_path / "s"), "--cond", str(f), "--quiet"])
    assert r.exit_code == 2 and "--cond given but the quantized UNet is unconditional" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "s" / "cad_log.json").exists()
