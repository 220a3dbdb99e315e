"""`pqcad-export calibrate` on a tiny UNet, and its one-line failures."""

import json

import pytest
from click.testing import CliRunner

from calibration import open_set
from pqcad_export.cli import main
from pqcad_export.model_io import load_model

SMALL = ["--steps", "6", "--n-per-step", "2", "--every-k", "2", "--dc-trajectories", "2", "--quiet"]


def _run(*args):
    return CliRunner().invoke(main, ["calibrate", *args])


def test_calibrate_cli_tiny(tiny_unet_dir, tmp_path):
    out = tmp_path / "calib"
    r = _run("--model", str(tiny_unet_dir), "--out", str(out), *SMALL)
    assert r.exit_code == 0, r.output
    assert "c_qc: 6 samples over 3 steps" in r.output and "c_dc: 3 samples over 3 steps" in r.output
    fp = load_model(tiny_unet_dir).fingerprint
    q = open_set(out, "c_qc", expect_fingerprint=fp)
    assert q.per_step_counts == {0: 2, 2: 2, 4: 2}
    man = json.loads((out / "c_qc" / "manifest.json").read_text())
    assert man["strategy"] == {"name": "uniform", "n_per_step": 2, "every_k": 2} and man["seed"] == 0
    assert open_set(out, "c_dc").per_step_counts == {0: 1, 2: 1, 4: 1}


def test_calibrate_cli_ndtc_no_dc(tiny_unet_dir, tmp_path):
    out = tmp_path / "calib"
    r = _run("--model", str(tiny_unet_dir), "--out", str(out), "--strategy", "ndtc", "--total", "5", "--no-dc", *SMALL)
    assert r.exit_code == 0, r.output
    assert len(open_set(out, "c_qc")) == 5 and not (out / "c_dc").exists()


@pytest.mark.parametrize("case", ["missing", "not_diffusers", "bad_config"])
def test_calibrate_cli_bad_model(tmp_path, case):
    model = tmp_path / "model"
    if case != "missing":
        model.mkdir()
        (model / "weights.bin").write_bytes(b"x")
    if case == "bad_config":
        (model / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    out = tmp_path / "out"
    r = _run("--model", str(model), "--out", str(out), *SMALL)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("args,msg", [(["--every-k", "0"], "--every-k"), (["--n-per-step", "-1"], "--n-per-step"),
                                      (["--steps", "0"], "--steps"), (["--preset", "fast"], "fast")])
def test_calibrate_cli_bad_usage(tiny_unet_dir, tmp_path, args, msg):
    out = tmp_path / "out"
    r = _run("--model", str(tiny_unet_dir), "--out", str(out), "--quiet", *args)
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_calibrate_help():
    r = _run("--help")
    assert r.exit_code == 0 and "--strategy" in r.output and "tdac" in r.output


def test_calibrate_cli_tdac(tiny_attn_unet_dir, tmp_path):
    out = tmp_path / "calib"
    r = _run("--model", str(tiny_attn_unet_dir), "--out", str(out), "--strategy", "tdac", "--no-dc", *SMALL)
    assert r.exit_code == 0, r.output
    q = open_set(out, "c_qc")
    assert q.per_step_counts == {0: 2, 2: 2, 4: 2} and q.manifest["n_trajectories"] == 4


@pytest.mark.slow
def test_calibrate_cli_quick_preset_defaults(tiny_unet_dir, tmp_path):
    """The quick preset at the contract's default --steps 100: 16 per step at every 5th step, one C_DC row per
    student step."""
    out = tmp_path / "calib"
    r = _run("--model", str(tiny_unet_dir), "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    q, d = open_set(out, "c_qc"), open_set(out, "c_dc")
    assert len(q) == 320 and q.per_step_counts == {s: 16 for s in range(0, 100, 5)}
    assert len(d) == 50 and d.per_step_counts == {s: 1 for s in range(0, 100, 2)}
    assert len(q.manifest["shards"]) == 2  # quick shards hold 256 rows
