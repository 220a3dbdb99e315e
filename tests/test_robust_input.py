"""Bad input is refused before any work: one `error:` line, exit code 2, nothing written (issue 24, item 1)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from conftest import _save, make_tiny_unet
from pqcad_export.cli import main


def one_line(res, code: int, msg: str) -> None:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], res.output


@pytest.fixture(scope="module")
def nan_unet_dir(tmp_path_factory):
    """A tiny UNet with one NaN weight inside a resnet (not in conv_in)."""
    u = make_tiny_unet(seed=3)
    with torch.no_grad():
        u.down_blocks[1].resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    return _save(u, tmp_path_factory.mktemp("nan_unet"))


@pytest.mark.parametrize("argv,msg", [
    (["build", "--bits", "w4a8", "--samples", "-5"], "--samples must be > 0, got -5"),
    (["build", "--bits", "w4a8", "--samples", "0"], "--samples must be > 0, got 0"),
    (["build", "--bits", "w4a8", "--latency-batch", "0"], "--latency-batch must be > 0"),
    (["build", "--bits", "w4a8", "--distill-iters", "-1"], "--distill-iters must be >= 0"),
    (["build", "--bits", "w4a8", "--qdrop", "1.5"], "--qdrop must be in [0, 1]"),
    (["build", "--bits", "w4a8", "--teacher-steps", "7", "--student-steps", "3"], "--student-steps"),
    (["build", "--bits", "w4a8", "--device", "cuda:0"], "--device"),
])
def test_build_options_refused_before_anything(argv, msg, tmp_path):
    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda:0 is valid here")
    res = CliRunner().invoke(main, [*argv, "--out", str(tmp_path / "r")])
    one_line(res, 2, msg)
    assert not (tmp_path / "r").exists()


def test_build_out_is_an_existing_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    res = CliRunner().invoke(main, ["build", "--bits", "w4a8", "--out", str(f)])
    one_line(res, 2, "exists and is not a directory")
    assert f.read_text() == "x"


def test_build_out_inside_a_read_only_directory(tmp_path):
    """A directory the user may not write to: mode 555 for a normal user; root ignores mode bits, so for root a
    directory of a read-only mount (/proc/sys) stands in."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
    else:
        from pathlib import Path

        ro = Path("/proc/sys")
        if not ro.is_dir() or os.access(ro, os.W_OK):
            pytest.skip("running as root with no read-only directory to try")
    res = CliRunner().invoke(main, ["build", "--bits", "w4a8", "--out", str(ro / "pqcad-run")])
    one_line(res, 2, "is not writable")
    assert not (ro / "pqcad-run").exists()


def test_compare_samples_zero(tmp_path):
    res = CliRunner().invoke(main, ["compare", "--engine", str(tmp_path), "--samples", "0"])
    one_line(res, 2, "--samples must be > 0, got 0")


@pytest.mark.parametrize("content,msg", [(b"", "is empty"), (b"\x08\x07 this is not protobuf \xff\xff\xff",
                                                             "unreadable ONNX file")])
def test_engine_and_lint_on_a_file_that_is_not_onnx(content, msg, tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(content)
    out = tmp_path / "eng"
    one_line(CliRunner().invoke(main, ["engine", "--onnx", str(f), "--out", str(out), "--backend", "onnxruntime"]),
             2, msg)
    assert not out.exists()  # no stray model.onnx
    res = CliRunner().invoke(main, ["lint", str(f)])
    one_line(res, 2, "unreadable ONNX file")
    assert "opset 0" not in res.output


def test_nan_weight_refused_by_calibrate_quantize_and_build(nan_unet_dir, tiny_unet_dir, tmp_path):
    """The probe names the parameter at fault (not conv_in) before any trajectory or block runs."""
    where = "down_blocks.1.resnets.0.conv1.weight"
    res = CliRunner().invoke(main, ["calibrate", "--model", str(nan_unet_dir), "--out", str(tmp_path / "c")])
    one_line(res, 2, where)
    assert not (tmp_path / "c").exists()
    res = CliRunner().invoke(main, ["quantize", "--model", str(nan_unet_dir), "--calib", str(tmp_path / "none"),
                                    "--bits", "w8a8", "--out", str(tmp_path / "q")])
    one_line(res, 2, where)
    assert not (tmp_path / "q").exists()
    res = CliRunner().invoke(main, ["build", "--bits", "w8a8", "--model", str(nan_unet_dir),
                                    "--out", str(tmp_path / "b")])
    one_line(res, 2, where)
    assert not (tmp_path / "b").exists()


def test_inf_in_the_forward_pass_is_refused(tmp_path):
    """Finite weights whose forward overflows: the probe names the first module that gives inf."""
    u = make_tiny_unet(seed=4)
    with torch.no_grad():
        u.down_blocks[0].resnets[0].conv2.weight.fill_(3e38)
    d = _save(u, tmp_path / "inf")
    res = CliRunner().invoke(main, ["calibrate", "--model", str(d), "--out", str(tmp_path / "c")])
    one_line(res, 2, "NaN/inf on a probe batch (first at down_blocks.0.resnets.0.conv2)")
    assert not (tmp_path / "c").exists()


def test_cond_file_checks(tiny_cond_unet_dir, tiny_unet_dir, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"encoder_hidden_states": torch.zeros(2, 4, 7)}, str(bad))
    res = CliRunner().invoke(main, ["build", "--bits", "w8a8", "--model", str(tiny_cond_unet_dir), "--cond", str(bad),
                                    "--out", str(tmp_path / "r")])
    one_line(res, 2, "cross_attention_dim is 16")
    res = CliRunner().invoke(main, ["build", "--bits", "w8a8", "--model", str(tiny_unet_dir), "--cond", str(bad),
                                    "--out", str(tmp_path / "r")])
    one_line(res, 2, "unconditional")
    (tmp_path / "junk.safetensors").write_text("junk")
    res = CliRunner().invoke(main, ["calibrate", "--model", str(tiny_cond_unet_dir), "--cond",
                                    str(tmp_path / "junk.safetensors"), "--out", str(tmp_path / "c")])
    one_line(res, 2, "not a readable safetensors file")
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_uneven_scheduler_grid_refused_before_the_first_stage(tmp_path):
    u = make_tiny_unet(seed=5)
    d = _save(u, tmp_path / "m")
    cfg = json.loads((d / "scheduler_config.json").read_text())
    (d / "scheduler_config.json").write_text(json.dumps({**cfg, "timestep_spacing": "linspace"}))
    res = CliRunner().invoke(main, ["build", "--bits", "w8a8", "--model", str(d), "--out", str(tmp_path / "r")])
    one_line(res, 2, '"timestep_spacing": "trailing"')
    assert not (tmp_path / "r").exists()


def test_quantize_refuses_a_nan_calibration_set(tiny_unet_dir, tmp_path):
    """A set written before the probe existed: refused as a bad set, not blamed on conv_in."""
    from calibration import CalibConfig, collect_cqc
    from calibration.storage import open_set, write_set
    from pqcad_export.model_io import load_model

    lm = load_model(tiny_unet_dir)
    good = tmp_path / "good"
    collect_cqc(lm, CalibConfig.preset("quick", steps=4, n_per_step=2, every_k=2, batch_size=2), good / "c_qc")
    s = open_set(good, "c_qc")
    rows = s.load_all()
    rows["sample"][0, 0, 0, 0] = float("nan")
    write_set(tmp_path / "bad" / "c_qc", "c_qc", rows, {k: v for k, v in s.manifest.items()
                                                        if k not in ("shards", "count", "fields", "kind")})
    res = CliRunner().invoke(main, ["quantize", "--model", str(tiny_unet_dir), "--calib", str(tmp_path / "bad"),
                                    "--bits", "w8a8", "--iters", "2", "--out", str(tmp_path / "q"), "--quiet"])
    one_line(res, 2, "holds NaN/inf values in 'sample'")
    assert "conv_in" not in res.output and not (tmp_path / "q" / "quant.json").exists()


@pytest.mark.parametrize("argv,msg", [
    (["build", "--bits", "w4a8", "--calib-strategy", "nope"], "unknown --calib-strategy 'nope'"),
    (["compare", "--engine", "e", "--ref-stats", "/nonexistent/stats.npz"], "--ref-stats /nonexistent/stats.npz"),
    (["lint", "x.onnx", "--json", "/proc/sys/pqcad-lint.json"], "--json"),
])
def test_more_options_refused_up_front(argv, msg, tmp_path):
    if argv[0] == "lint":
        if os.access("/proc/sys", os.W_OK) or not os.path.isdir("/proc/sys"):
            pytest.skip("no read-only directory to try")
    res = CliRunner().invoke(main, [*argv, "--out", str(tmp_path / "r")] if argv[0] != "lint" else argv)
    one_line(res, 2, msg)
    assert not (tmp_path / "r").exists()
