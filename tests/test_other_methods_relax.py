"""PCR activation relaxing (arXiv 2311.06322): per-step dispatch between the INT8 and a relaxed engine."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY
from engines.relax import RelaxedUNet, average_act_bits, relaxed_timesteps
from pqcad_export.model_io import DEFAULT_SCHEDULER_CONFIG
from pqcad_export.sampling import SamplerConfig, ddim_sample, ddim_timesteps


class Recorder:
    """A fake engine: eps = const * x, remembers the timesteps it was called with."""

    def __init__(self, k):
        self.k, self.seen = k, []

    def __call__(self, x, t, c=None):
        self.seen.extend(int(v) for v in t)
        return self.k * x


@pytest.mark.parametrize("where", ["x0", "xT"])
@pytest.mark.parametrize("steps,frac,n", [(20, 0.1, 2), (50, 0.1, 5), (50, 0.2, 10), (20, 0.05, 1)])
def test_relaxed_steps_run_on_the_second_engine(where, steps, frac, n):
    sched = dict(DEFAULT_SCHEDULER_CONFIG)
    grid = [int(t) for t in ddim_timesteps(sched, steps)]  # descending: x_T first
    relax = relaxed_timesteps(grid, frac, where)
    assert len(relax) == n
    expect = set(grid[-n:]) if where == "x0" else set(grid[:n])  # the chosen end of the trajectory
    assert set(relax) == expect
    a, b = Recorder(0.1), Recorder(0.2)
    fn = RelaxedUNet(a, b, relax)
    batch, n_img = 3, 6
    ddim_sample(fn, sched, (1, 4, 4), n_img, SamplerConfig(steps=steps, batch_size=batch, seed=0))
    n_batches = n_img // batch
    assert set(b.seen) == expect and not set(a.seen) & expect
    assert set(a.seen) | set(b.seen) == set(grid)
    assert fn.stats["relaxed"]["calls"] == n * n_batches and fn.stats["int8"]["calls"] == (steps - n) * n_batches
    assert fn.stats["relaxed"]["rows"] == n * n_img
    assert sorted(int(k) for k in fn.stats["relaxed"]["timesteps"]) == sorted(expect)
    assert fn.average_act_bits(steps) == pytest.approx((8 * (steps - n) + 32 * n) / steps)
    json.dumps(fn.stats)


def test_mixed_batch_is_split_by_row():
    a, b = Recorder(1.0), Recorder(2.0)
    fn = RelaxedUNet(a, b, [1, 21])
    x = torch.ones(4, 1, 2, 2)
    t = torch.tensor([1, 500, 21, 999])
    out = fn(x, t)
    assert out[:, 0, 0, 0].tolist() == [2.0, 1.0, 2.0, 1.0]
    assert sorted(b.seen) == [1, 21] and sorted(a.seen) == [500, 999]
    assert fn.stats["int8"]["calls"] == 1 and fn.stats["relaxed"]["calls"] == 1


def test_schedule_validation_and_average_bits():
    with pytest.raises(ValueError, match="relax-frac"):
        relaxed_timesteps(range(10), 0.5, "x0")
    with pytest.raises(ValueError, match="relax-where"):
        relaxed_timesteps(range(10), 0.1, "mid")
    assert relaxed_timesteps([981, 961, 941, 921, 901], 0.2, "xT") == [981]
    assert average_act_bits(50, 5, 8, 32) == pytest.approx(10.4)
    assert average_act_bits(50, 5, 8, 16) == pytest.approx(8.8)


# the conftest budgets; this run's report is about the relaxed candidate, so it skips the FP engine references
# (test_openvino covers them)
TINY_NO_REFS = {**TINY, "compare": {**TINY["compare"], "fp_references": False}}


def test_build_relax_candidate_end_to_end(tiny_unet_dir, tmp_path):
    from pqcad_export.pipeline.build import BuildConfig, run_build

    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_build(BuildConfig.flat(bits="w8a8", model=str(tiny_unet_dir), out=str(out), teacher_steps=10, student_steps=5,
                               backend="onnxruntime", samples=4, compare_batch=2, quiet=True,
                               overrides=TINY_NO_REFS, no_fid=True, relax_frac=0.2, relax_where="x0"))
    rep = json.loads((out / "report" / "compare.json").read_text())
    assert len(rep["candidates"]) == 2
    main, rel = rep["candidates"]
    assert "relax" not in main and rel["relax"]["where"] == "x0"
    grid = [int(t) for t in ddim_timesteps(DEFAULT_SCHEDULER_CONFIG, 5)]
    assert rel["relax"]["relaxed_timesteps"] == [min(grid)]
    assert rel["average_act_bits"] == pytest.approx((8 * 4 + 32) / 5)
    calls = rel["engine_calls"]
    # every image compare sampled (timed runs + FID samples) ran exactly one step on the relaxed engine, at the
    # smallest timestep, and each other grid step once on the INT8 engine; nothing else reached the relaxed one
    relaxed_rows = calls["relaxed"]["rows"]
    assert calls["relaxed"]["timesteps"] == {str(min(grid)): relaxed_rows} and relaxed_rows >= 4
    assert str(min(grid)) not in calls["int8"]["timesteps"]
    for t in set(grid) - {min(grid)}:
        assert calls["int8"]["timesteps"][str(t)] == relaxed_rows, t
    assert rel["unet_ms_per_call"] > 0 and rel["ms_per_image"] > 0
    assert rel["status"] == "ran (images not scored)"  # --no-fid: "executed" needs scored images (architecture.md)
    assert rel["model_bytes"] > main["model_bytes"]
    assert (out / "engine_relaxed" / "engine.json").is_file()
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "export" / "unet_relaxed.onnx")).graph.node}
    assert "DequantizeLinear" in ops and "QuantizeLinear" not in ops  # weights only: no activation QDQ


def test_build_bad_relax_options_exit_2(tmp_path):
    from click.testing import CliRunner

    from pqcad_export.cli import main

    r = CliRunner().invoke(main, ["build", "--bits", "w8a8", "--out", str(tmp_path / "r"), "--relax-frac", "0.5"])
    assert r.exit_code == 2 and "relax-frac" in r.output and not (tmp_path / "r").exists()
