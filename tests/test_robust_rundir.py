"""Run directories that cannot lie (issue 24, item 6): one build at a time, the scheduler in the stage keys, true
resume facts, SIGTERM ends like Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from click.testing import CliRunner

from conftest import _save, make_tiny_unet
from pqcad_export.cli import main
from pqcad_export.pipeline.build import BuildConfig, run_build
from pqcad_export.pipeline.lock import RunLock
from test_pipeline import TINY, tiny_cfg

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
_HOLD = "import sys, time; from pqcad_export.pipeline.lock import RunLock; RunLock(sys.argv[1]).acquire(); " \
        "print('locked', flush=True); time.sleep(120)"


def test_second_build_on_a_locked_run_dir_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = CliRunner().invoke(main, ["build", "--bits", "w8a8", "--out", str(run)])
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert f"in use by another build (pid {holder.pid}" in res.output
        assert not (run / "run.json").exists()  # nothing of the holder's run was touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(run).acquire().release()  # the killed holder's lock went with its process


def test_scheduler_edit_changes_the_calib_key(tmp_path):
    d = _save(make_tiny_unet(seed=6), tmp_path / "m")
    out = tmp_path / "r"
    run_build(tiny_cfg(d, out, stop_after="calib"))
    before = json.loads((out / "run.json").read_text())["stages"]["calib"]
    cfg = json.loads((d / "scheduler_config.json").read_text())
    (d / "scheduler_config.json").write_text(json.dumps({**cfg, "timestep_spacing": "leading"}))
    run_build(tiny_cfg(d, out, stop_after="calib"))
    after = json.loads((out / "run.json").read_text())["stages"]["calib"]
    assert after["key"] != before["key"] and after["started"] != before["started"]
    from calibration.storage import open_set

    assert open_set(out / "calib", "c_qc").manifest["timesteps"][0] == 900  # recollected on the leading grid


_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from pqcad_export.cli import friendly
    from pqcad_export.pipeline.build import BuildConfig, run_build
    friendly(lambda: run_build(BuildConfig.flat(**json.loads(sys.argv[1]))))()
""")


def test_sigterm_ends_like_ctrl_c_and_the_rerun_reports_reused_blocks(tiny_unet_dir, tmp_path):
    slow = {**TINY, "quant": {**TINY["quant"], "iters": 60}}
    out = tmp_path / "r"
    args = dict(bits="w4a8", model=str(tiny_unet_dir), out=str(out), teacher_steps=10, student_steps=5,
                backend="onnxruntime", samples=2, compare_batch=2, quiet=True, overrides=slow, no_fid=True,
                stop_after="quant")
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, json.dumps(args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = out / "quant" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(ckpt.glob("unit_*.safetensors"))) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines() == [
        "error: terminated (SIGTERM); finished stages and checkpoints are kept (rerun to resume)"]
    st = json.loads((out / "run.json").read_text())["stages"]
    assert st["calib"]["status"] == "done" and st["quant"]["status"] == "failed"
    n_done = len(json.loads((ckpt / "progress.json").read_text())["done"])
    assert n_done >= 1
    run_build(BuildConfig.flat(**args))  # the lock went with the terminated process
    q = json.loads((out / "run.json").read_text())["stages"]["quant"]
    assert q["status"] == "done" and q["resumed"] is True and q["reused_blocks"] == n_done
    assert q["rerun_after_interruption"] is True


def test_a_fresh_stage_does_not_claim_to_have_resumed(tiny_unet_dir, tmp_path):
    out = tmp_path / "r"
    run_build(tiny_cfg(tiny_unet_dir, out, stop_after="student"))
    st = json.loads((out / "run.json").read_text())["stages"]
    assert st["quant"]["resumed"] is False and st["quant"]["reused_blocks"] == 0
    assert st["student"]["resumed"] is False and st["student"]["resumed_from_iter"] == 0
