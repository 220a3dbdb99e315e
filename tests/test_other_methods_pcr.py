"""PCR progressive calibration (arXiv 2311.06322): C_QC along the quantized model's own trajectory (tiny UNet)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from calibration import CalibConfig, open_set
from calibration.collect import collect_cqc
from calibration.pcr import stage_bounds
from pqcad_export.cli import main
from pqcad_export.errors import UsageError
from pqcad_export.model_io import load_model
from pqcad_export.sampling import SamplerConfig, TorchUNet, ddim_sample

T, N = 8, 3
TINY_RECON = {"iters": 4, "act_iters": 2, "batch_size": 4, "max_calib": 12, "capture_batch_size": 12}


def _cfg(strategy, **kw):
    base = dict(steps=T, strategy=strategy, n_per_step=N, every_k=1, batch_size=N, with_dc=False, seed=0,
                pcr_bits="w4a8", pcr_stages=2, pcr_method="direct", pcr_recon=TINY_RECON)
    base.update(kw)
    return CalibConfig.preset("quick", **base)


def _by_key(rows):
    return {(int(s), int(tr)): x for s, tr, x in zip(rows["step_index"], rows["trajectory"], rows["sample"])}


@pytest.fixture(scope="module")
def pcr_run(tiny_unet_dir, tmp_path_factory):
    torch.set_num_threads(1)
    lm = load_model(tiny_unet_dir)
    d = tmp_path_factory.mktemp("pcr")
    models = {}
    from calibration.pcr import collect_pcr

    man = collect_pcr(lm, _cfg("pcr"), d / "pcr", on_stage_model=lambda k, q: models.__setitem__(k, q))
    man_u = collect_cqc(lm, _cfg("uniform"), d / "uniform")
    return lm, d, man, man_u, models


def test_stage_bounds():
    assert stage_bounds(8, 2) == [(0, 4), (4, 8)]
    assert stage_bounds(100, 4) == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert stage_bounds(5, 5) == [(i, i + 1) for i in range(5)]
    with pytest.raises(UsageError):
        stage_bounds(8, 9)


def test_pcr_stage1_is_fp_later_stages_follow_the_quantized_model(pcr_run):
    lm, d, man, man_u, models = pcr_run
    assert man["count"] == man_u["count"] == T * N
    assert set(models) == {1}
    pcr, uni = _by_key(open_set(d / "pcr").load_all()), _by_key(open_set(d / "uniform").load_all())
    assert pcr.keys() == uni.keys()
    # stage 1 (steps 0-3): the FP trajectories, row for row
    for (s, tr), x in pcr.items():
        if s < 4:
            assert torch.equal(x, uni[(s, tr)]), (s, tr)
    # stage 2 (steps 4-7): different from FP (the quantized model drove the trajectory) ...
    for s in range(4, T):
        dev = max(float((pcr[(s, tr)] - uni[(s, tr)]).abs().max()) for tr in range(N))
        assert dev > 1e-4, f"step {s}: PCR input equals the FP input"
    # ... and exactly what a replay of the stage-1 quantized model from the same noise produces
    seen = {}

    def on_step(i, t, x, c):
        for tr in range(x.shape[0]):
            seen[(i, tr)] = x[tr].clone()

    ddim_sample(TorchUNet(models[1].unet), lm.scheduler_config, lm.sample_shape, N,
                SamplerConfig(steps=T, eta=0.0, batch_size=N, seed=0), on_step=on_step)
    for s in range(4, T):
        for tr in range(N):
            assert torch.allclose(pcr[(s, tr)], seen[(s, tr)], atol=1e-6, rtol=0), (s, tr)
    # the quantized model was calibrated on stage 1 only
    log = man["pcr"]["stages"]
    assert [e["steps"] for e in log] == [[0, 3], [4, 7]]
    assert log[0]["driver"] == "fp" and log[0]["quant_rows"] == 4 * N and "quantized w4a8" in log[1]["driver"]
    assert man["strategy"]["name"] == "pcr" and man["strategy"]["bits"] == "w4a8"


def test_pcr_config_and_cli_errors(tmp_path):
    assert "pcr_bits" not in CalibConfig.preset("quick").to_dict()  # other strategies: resume keys unchanged
    assert CalibConfig.preset("quick", strategy="pcr").to_dict()["pcr_stages"] == 2
    with pytest.raises(UsageError, match="pcr-stages"):
        CalibConfig.preset("quick", strategy="pcr", steps=4, pcr_stages=5)
    r = CliRunner().invoke(main, ["calibrate", "--out", str(tmp_path / "c"), "--strategy", "pcr", "--steps", "4"])
    assert r.exit_code == 2 and "--bits" in r.output, r.output
    assert not (tmp_path / "c" / "c_qc" / "manifest.json").exists()
    r = CliRunner().invoke(main, ["calibrate", "--out", str(tmp_path / "c"), "--strategy", "pcr", "--bits", "w5a8"])
    assert r.exit_code == 2


def test_pcr_bits_is_a_bitspec_with_the_old_serialised_key():
    """pcr_bits is parsed once into a BitSpec, yet the config's serialised form (the calibration resume key and the
    manifest's config) is the 'wKaA' string it always was: run directories made before still resume."""
    from pqcad_export.bits import parse_bits

    kw = dict(strategy="pcr", pcr_method="direct", pcr_recon={"iters": 4})
    a = CalibConfig.preset("quick", pcr_bits="w4a8", **kw)
    b = CalibConfig.preset("quick", pcr_bits=parse_bits("w4a8"), **kw)
    assert a.pcr_bits == b.pcr_bits == parse_bits("w4a8") and a.pcr().bits == parse_bits("w4a8")
    assert a.to_dict()["pcr_bits"] == b.cqc_dict()["pcr_bits"] == "w4a8"
    # the digests of the string-field config (computed before the change): the keys of existing run dirs
    import hashlib

    assert a.fingerprint() == b.fingerprint() == "4174085a7ade8475"
    assert hashlib.sha1(json.dumps(b.cqc_dict(), sort_keys=True).encode()).hexdigest()[:16] == "bb0dfeebc2b91d78"
    with pytest.raises(UsageError, match="unsupported --bits 'w5a8'"):
        CalibConfig.preset("quick", pcr_bits="w5a8", **kw)


def test_build_calib_strategy_pcr(tiny_unet_dir, tmp_path):
    from pqcad_export.pipeline.build import BuildConfig, run_build

    over = {"calib": {"n_per_step": 2, "every_k": 2, "batch_size": 2, "dc_trajectories": 2, "shard_size": 8},
            "quant": dict(TINY_RECON)}
    out = tmp_path / "run"
    run_build(BuildConfig.flat(bits="w8a8", model=str(tiny_unet_dir), out=str(out), teacher_steps=6, student_steps=3,
                               method="direct", calib_strategy="pcr", quiet=True, overrides=over, stop_after="calib"))
    man = json.loads((out / "calib" / "c_qc" / "manifest.json").read_text())
    assert man["strategy"]["name"] == "pcr" and man["strategy"]["bits"] == "w8a8"
    assert man["strategy"]["method"] == "direct" and man["strategy"]["recon_overrides"]["iters"] == 4
    assert len(man["pcr"]["stages"]) == 2 and man["count"] == 3 * 2
