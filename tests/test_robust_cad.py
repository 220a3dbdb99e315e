"""CAD checkpointing defects (issue 24, item 7): short runs checkpoint, an interrupted run keeps its last update,
the resumed progress line shows a real rate, and the log says whether it resumed."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from pqcad_export.distill import CadConfig, distill
from pqcad_export.distill.cad import CHECKPOINT
from pqcad_export.interrupts import Terminated
from test_distill_cad import setup  # noqa: F401  (module fixture: a tiny quantized teacher + C_DC)


def cfg(**kw) -> CadConfig:
    # the quick preset checkpoints every 40 updates: these runs are shorter than that
    base = dict(iters=10, batch_size=2, n_train_images=4, eval_images=2, eval_steps=2, log_every=3, cdc_batch=2,
                gap_samples=0)
    base.update(kw)
    return CadConfig.preset("quick", **base)


def test_short_run_checkpoints_and_sigterm_keeps_the_update_in_flight(setup, tmp_path):  # noqa: F811
    out = tmp_path / "s"
    seen = {}

    def on_iter(i):
        seen[i] = (out / CHECKPOINT).is_file()
        if i == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives between updates: kept, then the run ends

    c = cfg()
    assert c.checkpoint_every == 40
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        distill(setup["quant"], setup["calib"], c, out, fp_model=setup["model"], on_iter=on_iter)
    assert seen[4] is True  # checkpointed before update 4 although checkpoint_every is 40 (every 3 here)
    import torch

    assert torch.load(out / CHECKPOINT, weights_only=False)["iter"] == 5  # not a multiple of 3: the interrupt's
    assert signal.getsignal(signal.SIGTERM) is before  # CAD's deferring handler is gone again


def test_resumed_progress_rate_counts_only_this_process(setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "s"

    def stop(i):
        if i == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(setup["quant"], setup["calib"], cfg(), out, fp_model=setup["model"], on_iter=stop)
    capsys.readouterr()
    distill(setup["quant"], setup["calib"], cfg(), out, fp_model=setup["model"], quiet=False)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("CAD: distilling")]
    assert lines and all("resumed at update 8 of 10" in ln for ln in lines), lines
    last = re.search(r": (\d+)/(\d+) \(([\d.]+)/s\)", lines[-1])
    assert last and last.group(1, 2) == ("2", "2")
    assert float(last.group(3)) < 1000  # 2 updates of a real UNet, not 8 checkpointed ones in 0 s
    assert json.loads((out / "cad_log.json").read_text())["resumed_from"] == 8


def test_student_stage_resume_fact_in_run_json(tmp_path):
    """run.json says resumed only when CAD really continued from a checkpoint."""
    from conftest import _save, make_tiny_unet
    from pqcad_export.pipeline.build import run_build
    from test_pipeline import TINY, tiny_cfg

    d = _save(make_tiny_unet(seed=8), tmp_path / "m")
    over = {**TINY, "student": {**TINY["student"], "iters": 6}}
    import pqcad_export.distill.cad as cad

    real = cad.run_cad

    def interrupted(*a, **kw):
        def stop(i):
            if i == 4:
                raise KeyboardInterrupt
        return real(*a, **{**kw, "on_iter": stop})

    cad.run_cad = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_build(tiny_cfg(d, tmp_path / "r", overrides=over, stop_after="student"))
    finally:
        cad.run_cad = real
    run_build(tiny_cfg(d, tmp_path / "r", overrides=over, stop_after="student"))
    st = json.loads((tmp_path / "r/run.json").read_text())["stages"]["student"]
    assert st["resumed"] is True and st["resumed_from_iter"] == 4
