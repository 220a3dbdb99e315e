"""Block reconstruction, checkpoint/resume, saved format, `quantize` CLI (tiny seeded UNets, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from pqcad_export.cli import main
from pqcad_export.errors import PqcadError, UsageError
from pqcad_export.model_io import load_model
from pqcad_export.quantize import ReconConfig, load_quantized, quantize_model, save_quantized
from pqcad_export.quantize.quantizers import qrange
from pqcad_export.sampling import SamplerConfig, TorchUNet, ddim_sample


def collect(lm, n=8, steps=8, every=2, seed=0):
    """A few time-step-aware inputs (x_t, t) from the FP model's DDIM trajectories."""
    batches = []

    def on_step(i, t, x, c):
        if i % every == 0:
            batches.append({"sample": x.clone(), "timestep": t.clone()})

    ddim_sample(TorchUNet(lm.unet), lm.scheduler_config, lm.sample_shape, n,
                SamplerConfig(steps=steps, batch_size=n, seed=seed), on_step=on_step)
    return batches


def small_cfg(**kw):
    base = dict(iters=60, act_iters=10, batch_size=8, max_calib=32, progress=False)
    base.update(kw)
    return ReconConfig.preset("quick", **base)


@pytest.fixture(scope="module")
def attn_model(tiny_attn_unet_dir):
    torch.set_num_threads(1)
    lm = load_model(tiny_attn_unet_dir)
    return lm, collect(lm)


@pytest.fixture(scope="module")
def plain_model(tiny_unet_dir):
    torch.set_num_threads(1)
    lm = load_model(tiny_unet_dir)
    return lm, collect(lm)


@pytest.fixture(scope="module")
def w4a8_direct(attn_model):
    lm, batches = attn_model
    return quantize_model(lm, batches, "w4a8", "direct", small_cfg(iters=100))


def _assert_on_grid(qm, bits):
    n = 0
    for name, m in qm.quant_layers():
        k = m.weight_bits
        assert k == (8 if name in ("conv_in", "conv_out") else bits)
        wi = m.weight_int()
        lo, hi = qrange(k)
        assert wi.dtype == torch.int8 and int(wi.min()) >= lo and int(wi.max()) <= hi
        assert max(len(torch.unique(r)) for r in wi.reshape(wi.shape[0], -1)) <= 2 ** k
        shape = [-1] + [1] * (wi.dim() - 1)
        assert torch.equal(m.weight, wi.float() * m.weight_scale().view(shape))
        n += 1
    assert n > 10


def test_w4a8_learned_rounding_beats_nearest_in_every_block(w4a8_direct):
    qm = w4a8_direct
    _assert_on_grid(qm, 4)
    units = [u for u in qm.log["units"] if u["layers"]]
    assert len(units) >= 15
    for u in units:
        if 4 in u["bits_final"]:
            assert u["pert_w"] < u["pert_nearest_w"], u["name"]
        else:  # conv_in: 8-bit, 144 weights; AdaRound may keep every nearest rounding
            assert u["pert_w"] <= u["pert_nearest_w"], u["name"]
    assert all(u["pert"] > 0 for u in qm.log["units"])
    assert qm.log["geomean_pert"] > 0


def test_w8a8_on_grid_and_smaller_error_than_w4a8(attn_model, w4a8_direct):
    lm, batches = attn_model
    qm8 = quantize_model(lm, batches, "w8a8", "direct", small_cfg(iters=20, act_iters=5))
    _assert_on_grid(qm8, 8)
    assert qm8.log["geomean_pert"] < w4a8_direct.log["geomean_pert"]


def test_save_load_round_trip_is_exact(w4a8_direct, attn_model, tmp_path):
    lm, batches = attn_model
    qm = w4a8_direct
    save_quantized(qm, tmp_path / "q", {"steps": 100})
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert meta["bits"] == "w4a8" and meta["steps"] == 100 and meta["method"] == "direct"
    assert meta["source_fingerprint"] == lm.fingerprint and meta["scheduler_config"]["num_train_timesteps"] == 1000
    assert meta["layers"]["conv_in"]["weight_bits"] == 8
    assert any(v.get("split") for v in meta["layers"].values())
    q2 = load_quantized(tmp_path / "q")
    x, t = batches[1]["sample"], batches[1]["timestep"]
    with torch.no_grad():
        assert torch.equal(qm(x, t), q2(x, t))
    s1, s2 = qm.unet.state_dict(), q2.unet.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    for (n1, a), (n2, b) in zip(qm.quant_layers(), q2.quant_layers()):
        assert n1 == n2 and a.act_scales() == b.act_scales() and torch.equal(a.weight_int(), b.weight_int())
    assert q2.log["units"] and q2.steps == 100 and q2.bits.name == "w4a8"
    with pytest.raises(PqcadError):
        load_quantized(tmp_path)


def test_checkpoint_resume_is_bit_identical(plain_model, tmp_path):
    lm, batches = plain_model
    cfg = small_cfg(iters=8, act_iters=4, max_calib=16)
    ref = quantize_model(lm, batches, "w4a8", "direct", cfg)

    class Killed(Exception):
        pass

    def kill_after_3(i, name):
        if i == 2:
            raise Killed

    with pytest.raises(Killed):
        quantize_model(lm, batches, "w4a8", "direct", cfg, checkpoint_dir=tmp_path, on_unit_done=kill_after_3)
    assert len(json.loads((tmp_path / "progress.json").read_text())["done"]) == 3
    seen = []
    res = quantize_model(lm, batches, "w4a8", "direct", cfg, checkpoint_dir=tmp_path,
                         on_unit_done=lambda i, n: seen.append(i))
    assert seen and min(seen) == 3  # finished blocks were skipped
    s1, s2 = ref.unet.state_dict(), res.unet.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    x, t = batches[0]["sample"], batches[0]["timestep"]
    with torch.no_grad():
        assert torch.equal(ref(x, t), res(x, t))
    assert [u["name"] for u in res.log["units"]] == [u["name"] for u in ref.log["units"]]


def test_nan_names_the_block_and_writes_nothing(plain_model, tmp_path):
    lm, batches = plain_model
    bad = [{"sample": b["sample"].clone(), "timestep": b["timestep"]} for b in batches]
    bad[0]["sample"][0, 0, 0, 0] = float("nan")
    with pytest.raises(PqcadError, match="block conv_in"):  # the first block that sees the NaN sample
        quantize_model(lm, bad, "w4a8", "direct", small_cfg(iters=5, act_iters=2), checkpoint_dir=tmp_path)
    done = json.loads((tmp_path / "progress.json").read_text())["done"]
    assert "conv_in" not in done and len(list(tmp_path.glob("unit_*.safetensors"))) == len(done)


def test_bad_inputs(plain_model, tiny_cond_unet_dir):
    lm, batches = plain_model
    cfg = small_cfg(iters=2, act_iters=1)
    with pytest.raises(UsageError):
        quantize_model(lm, batches, "w3a8", "direct", cfg)
    with pytest.raises(UsageError):
        quantize_model(lm, batches, "w4a8", "nope", cfg)
    with pytest.raises(PqcadError, match="no calibration"):
        quantize_model(lm, [], "w4a8", "direct", cfg)
    with pytest.raises(PqcadError, match="shape"):
        quantize_model(lm, [{"sample": torch.zeros(2, 3, 16, 16), "timestep": torch.zeros(2, dtype=torch.long)}],
                       "w4a8", "direct", cfg)
    with pytest.raises(PqcadError, match="dicts"):
        quantize_model(lm, [torch.zeros(2, 1, 16, 16)], "w4a8", "direct", cfg)
    with pytest.raises(UsageError):
        ReconConfig.preset("fast")
    cond = load_model(tiny_cond_unet_dir)
    with pytest.raises(PqcadError, match="encoder_hidden_states"):
        quantize_model(cond, [{"sample": torch.zeros(2, 2, 8, 8), "timestep": torch.zeros(2, dtype=torch.long)}],
                       "w4a8", "direct", cfg)


@pytest.mark.slow
def test_cond_unet_quantizes_and_reloads(tiny_cond_unet_dir, tmp_path):
    lm = load_model(tiny_cond_unet_dir)
    g = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(4, 2, 8, 8, generator=g), "timestep": torch.tensor([999, 700, 300, 20]),
                "encoder_hidden_states": torch.randn(4, 3, 16, generator=g)}]
    qm = quantize_model(lm, batches, "w4a8", "direct", small_cfg(iters=10, act_iters=3, attn_matmul_quant=True))
    save_quantized(qm, tmp_path)
    q2 = load_quantized(tmp_path)
    b = batches[0]
    with torch.no_grad():
        assert torch.equal(qm(b["sample"], b["timestep"], b["encoder_hidden_states"]),
                           q2(b["sample"], b["timestep"], b["encoder_hidden_states"]))
    assert list(q2.attn_processors())


def test_cli_bad_bits_exit_2_nothing_written(tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", "--calib", str(tmp_path), "--bits", "w5a8", "--out", str(out)])
    assert r.exit_code == 2 and "error:" in r.output and "w5a8" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_cli_quantize_end_to_end(plain_model, tiny_unet_dir, tmp_path):
    from calibration.storage import write_set

    lm, batches = plain_model
    rows = {"sample": torch.cat([b["sample"] for b in batches]),
            "timestep": torch.cat([b["timestep"] for b in batches])}
    n = rows["sample"].shape[0]
    rows["step_index"] = torch.arange(n) % 4
    rows["trajectory"] = torch.arange(n) // 4
    write_set(tmp_path / "calib" / "c_qc", "c_qc", rows, {"fingerprint": lm.fingerprint})
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", "--model", str(tiny_unet_dir), "--calib", str(tmp_path / "calib"),
                                  "--bits", "w4a8", "--out", str(out), "--iters", "6", "--quiet",
                                  "--compare-direct"])
    assert r.exit_code == 0, r.output
    assert (out / "quant.json").is_file() and (out / "quantized.safetensors").is_file()
    assert (out / "quant_curve.png").is_file() and not (out / "checkpoints").exists()
    q = load_quantized(out)
    assert q.method == "pq" and q.bits.name == "w4a8"
    assert isinstance(q.log["delta_pert_vs_direct"], float) and "Delta_Pert" in r.output
    r = CliRunner().invoke(main, ["quantize", "--model", str(tiny_unet_dir), "--calib", str(tmp_path / "nope"),
                                  "--bits", "w4a8", "--out", str(tmp_path / "q2")])
    assert r.exit_code == 1 and "error:" in r.output


def test_run_quantize_feeds_the_conditioning_of_a_conditional_set(tiny_cond_unet_dir, tmp_path):
    """The one quantize stage (CLI, build, research) keeps encoder_hidden_states and records the set's length."""
    from calibration.storage import write_set
    from pqcad_export.bits import parse_bits
    from pqcad_export.quantize.stage import run_quantize

    lm = load_model(tiny_cond_unet_dir)
    g = torch.Generator().manual_seed(0)
    rows = {"sample": torch.randn(8, 2, 8, 8, generator=g), "timestep": torch.tensor([999, 700, 300, 20] * 2),
            "encoder_hidden_states": torch.randn(8, 3, 16, generator=g),
            "step_index": torch.arange(8) % 4, "trajectory": torch.arange(8) // 4}
    write_set(tmp_path / "calib" / "c_qc", "c_qc", rows,
              {"fingerprint": lm.fingerprint, "conditioning": {"source": "random", "shape": [3, 16]}})
    out = tmp_path / "q"
    qm = run_quantize(lm, tmp_path / "calib", parse_bits("w4a8"), "direct", small_cfg(iters=4, act_iters=2), out,
                      "cpu", seed=0, meta={"steps": 10}, keep_checkpoints=False)
    meta = json.loads((out / "quant.json").read_text())
    assert meta["conditioning"] == {"source": "calibration set (random)", "shape": [None, 3, 16]}
    assert meta["steps"] == 10 and qm.bits.name == "w4a8" and not (out / "checkpoints").exists()
