"""calibration/: storage format, strategies, C_QC and C_DC collection on tiny UNets (CPU, seeded, fast)."""

import json

import numpy as np
import pytest
import torch

from calibration import (CalibConfig, CalibSet, STRATEGIES, calibrate, collect_cdc, collect_cqc, dc_counts,
                         get_strategy, is_complete, open_set, predicted_x0, register_strategy, tdac_scores, write_set)
from calibration.strategies import TDAC, Uniform, largest_remainder
from pqcad_export.errors import PqcadError, UsageError
from pqcad_export.model_io import load_model
from pqcad_export.sampling import SamplerConfig, TorchUNet, ddim_sample, ddim_timesteps

META = {"fingerprint": "abc123", "steps": 10}


def _rows(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn((n, 2, 4, 4), generator=g),
            "timestep": torch.randint(0, 1000, (n,), generator=g),
            "step_index": torch.arange(n, dtype=torch.int64) // 4,
            "trajectory": torch.arange(n, dtype=torch.int64)}


def _cfg(**kw):
    base = dict(steps=6, n_per_step=3, every_k=2, batch_size=4, shard_size=5, dc_trajectories=3)
    base.update(kw)
    return CalibConfig.preset("quick", **base)


@pytest.fixture(scope="module")
def tiny(tiny_unet_dir):
    return load_model(tiny_unet_dir)


# ---------------------------------------------------------------------------------------------- storage
def test_round_trip_bit_exact(tmp_path):
    rows = _rows()
    rows["sample"][3, 0, 0, 0] = float("nan")  # bit patterns survive, NaN included
    man = write_set(tmp_path, "c_qc", rows, META, shard_size=7)
    assert [s["count"] for s in man["shards"]] == [7, 7, 6] and man["count"] == 20
    assert man["fields"]["sample"]["shape"] == [2, 4, 4] and man["fields"]["timestep"]["dtype"] == "int64"
    back = open_set(tmp_path).load_all()
    for k, v in rows.items():
        assert back[k].dtype == v.dtype
        assert torch.equal(back[k].view(torch.int32) if v.is_floating_point() else back[k],
                           v.view(torch.int32) if v.is_floating_point() else v)
    batches = list(open_set(tmp_path).iter_batches(batch_size=6))
    assert [b["sample"].shape[0] for b in batches] == [6, 6, 6, 2]
    assert torch.equal(torch.cat([b["trajectory"] for b in batches]), rows["trajectory"])
    assert len(list(open_set(tmp_path).iter_batches(batch_size=6, drop_last=True))) == 3


def test_batches_stream_shard_by_shard(tmp_path, monkeypatch):
    write_set(tmp_path, "c_qc", _rows(), META, shard_size=4)  # 5 shards, one step each
    s = open_set(tmp_path)
    loads = []
    orig = CalibSet.load_shard
    monkeypatch.setattr(CalibSet, "load_shard", lambda self, i: (loads.append(i), orig(self, i))[1])
    it = s.iter_batches(batch_size=3)
    next(it)
    assert loads == [0]  # only the first shard was read for the first batch
    rest = list(it)
    assert loads == [0, 1, 2, 3, 4] and sum(b["sample"].shape[0] for b in rest) == 17
    loads.clear()
    got = torch.cat([b["step_index"] for b in s.iter_batches(batch_size=2, steps=[1, 3])])
    assert sorted(got.tolist()) == [1] * 4 + [3] * 4 and loads == [1, 3]  # other shards never read
    assert torch.equal(s.load_all(steps=[2])["trajectory"], torch.arange(8, 12))


def test_shuffle_is_seeded_permutation(tmp_path):
    write_set(tmp_path, "c_qc", _rows(), META, shard_size=6)
    s = open_set(tmp_path)
    a = torch.cat([b["trajectory"] for b in s.iter_batches(5, shuffle=True, seed=1)])
    b = torch.cat([b["trajectory"] for b in s.iter_batches(5, shuffle=True, seed=1)])
    c = torch.cat([b["trajectory"] for b in s.iter_batches(5, shuffle=True, seed=2)])
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, torch.arange(20))
    assert sorted(a.tolist()) == list(range(20))


def test_bad_sets_are_one_line_errors(tmp_path):
    with pytest.raises(PqcadError, match="does not exist"):
        open_set(tmp_path / "nope")
    with pytest.raises(PqcadError, match="no calibration manifest"):
        open_set(tmp_path, "c_qc")
    d = tmp_path / "set"
    write_set(d, "c_qc", _rows(), META, shard_size=8)
    with pytest.raises(PqcadError, match="not from this model"):
        open_set(d, expect_fingerprint="other")
    with pytest.raises(PqcadError, match="holds a c_qc set, expected c_dc"):
        open_set(d, "c_dc")
    # flipped byte in a shard -> checksum error (on read), truncated shard -> corrupt
    shard = d / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PqcadError, match="checksum mismatch"):
        open_set(d).load_all()
    shard.write_bytes(bytes(data[:40]))
    with pytest.raises(PqcadError, match="corrupt calibration shard"):
        open_set(d, verify=False).load_all()
    shard.unlink()
    with pytest.raises(PqcadError, match="shard missing"):
        open_set(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(PqcadError, match="corrupt calibration manifest"):
        open_set(d)
    (d / "manifest.json").write_text(json.dumps({"kind": "c_qc"}))
    with pytest.raises(PqcadError, match="missing format_version"):
        open_set(d)
    for err in (PqcadError,):
        try:
            open_set(d)
        except err as exc:
            assert "\n" not in str(exc)


def test_rewrite_replaces_old_set(tmp_path):
    write_set(tmp_path, "c_qc", _rows(20), META, shard_size=4)
    write_set(tmp_path, "c_qc", _rows(6, seed=3), META, shard_size=4)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert len(open_set(tmp_path)) == 6 and not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------- strategies
def test_uniform_counts():
    c = get_strategy(CalibConfig(steps=100, n_per_step=256, every_k=5)).counts(100)
    assert c.sum() == 5120 and np.flatnonzero(c).tolist() == list(range(0, 100, 5)) and set(c[c > 0]) == {256}
    c1 = Uniform(CalibConfig(steps=10, n_per_step=3, every_k=1)).counts(10)
    assert c1.tolist() == [3] * 10


def test_ndtc_total_and_shape():
    cfg = CalibConfig(steps=100, strategy="ndtc", n_per_step=256, every_k=5)
    c = get_strategy(cfg).counts(100)
    assert c.sum() == 5120 and len(c) == 100 and (c >= 0).all()
    peak = int(np.argmax(c))
    assert 45 <= peak <= 54
    assert (np.diff(c[:peak]) >= 0).all() and (np.diff(c[peak + 1:]) <= 0).all()  # unimodal
    assert abs(int(c[:50].sum()) - int(c[50:].sum())) <= 60  # symmetric about the middle
    assert c[0] < c[peak] / 5
    c2 = get_strategy(CalibConfig(steps=50, strategy="ndtc", n_total=77)).counts(50)
    assert c2.sum() == 77
    assert largest_remainder(np.array([1.0, 1.0, 1.0]), 10).tolist() == [4, 3, 3]


def test_strategy_plugin(tiny, tmp_path):
    @register_strategy
    class LastStep(Uniform):
        name = "last_step_test"

        def counts(self, steps):
            c = np.zeros(steps, dtype=np.int64)
            c[-1] = self.cfg.n_per_step
            return c

    try:
        man = collect_cqc(tiny, _cfg(strategy="last_step_test"), tmp_path)
        assert man["per_step_counts"] == {"5": 3} and man["strategy"]["name"] == "last_step_test"
    finally:
        STRATEGIES.pop("last_step_test")


def test_config_presets_and_errors():
    q, p = CalibConfig.preset("quick"), CalibConfig.preset("paper")
    assert p.uniform_budget == 5120 and q.uniform_budget < p.uniform_budget
    assert CalibConfig.preset("quick", n_per_step=None).n_per_step == q.n_per_step
    with pytest.raises(UsageError, match="unknown preset"):
        CalibConfig.preset("fast")
    with pytest.raises(UsageError, match="--every-k"):
        CalibConfig.preset("quick", every_k=0)
    with pytest.raises(UsageError, match="unknown --strategy"):
        CalibConfig.preset("quick", strategy="nope")


# ---------------------------------------------------------------------------------------------- C_QC
def test_cqc_rows_are_the_fp_trajectory_states(tiny, tmp_path):
    cfg = _cfg(n_trajectories=5)
    man = collect_cqc(tiny, cfg, tmp_path / "q")
    assert man["kind"] == "c_qc" and man["fingerprint"] == tiny.fingerprint
    assert man["per_step_counts"] == {"0": 3, "2": 3, "4": 3} and man["count"] == 9
    assert man["timesteps"] == ddim_timesteps(tiny.scheduler_config, 6).tolist()
    assert is_complete(tmp_path / "q", "c_qc", tiny.fingerprint, cfg.cqc_dict())
    assert not is_complete(tmp_path / "q", "c_qc", "different")
    rows = open_set(tmp_path / "q", "c_qc", expect_fingerprint=tiny.fingerprint).load_all()
    # replay the same trajectories and compare bit for bit
    seen = {}
    ddim_sample(TorchUNet(tiny.unet), tiny.scheduler_config, tiny.sample_shape, 5,
                SamplerConfig(steps=6, eta=0.0, batch_size=cfg.batch_size, seed=cfg.seed),
                on_step=lambda i, t, x, c: seen.setdefault(i, []).append((t.clone(), x.clone())))
    seen = {i: (torch.cat([p[0] for p in v]), torch.cat([p[1] for p in v])) for i, v in seen.items()}
    for k in range(9):
        i, j = int(rows["step_index"][k]), int(rows["trajectory"][k])
        assert int(rows["timestep"][k]) == int(seen[i][0][j])
        assert torch.equal(rows["sample"][k], seen[i][1][j])
    for i in (0, 2, 4):  # distinct trajectories within a step
        assert len(set(rows["trajectory"][rows["step_index"] == i].tolist())) == 3
    again = collect_cqc(tiny, cfg, tmp_path / "q2")
    r2 = open_set(tmp_path / "q2").load_all()  # reproducible (file bytes may differ: header key order)
    assert again["count"] == 9 and all(torch.equal(rows[f], r2[f]) for f in rows)


def test_cqc_conditional_and_batches(tiny_cond_unet_dir, tmp_path):
    m = load_model(tiny_cond_unet_dir)
    man = collect_cqc(m, _cfg(steps=4, n_per_step=2, every_k=1, batch_size=1), tmp_path)
    assert man["conditioning"]["source"] == "random_normal"
    r = open_set(tmp_path).load_all()
    assert r["encoder_hidden_states"].shape == (8, 8, 16) and r["sample"].shape == (8, 2, 8, 8)
    # batch_size=1: trajectory ids still follow the batches
    assert set(r["trajectory"].tolist()) <= {0, 1}


def test_too_few_trajectories_is_usage_error(tiny, tmp_path):
    with pytest.raises(UsageError, match="trajectories"):
        collect_cqc(tiny, _cfg(n_trajectories=2), tmp_path)


# ---------------------------------------------------------------------------------------------- C_DC
def test_cdc_one_sample_per_even_step(tiny, tmp_path):
    cfg = _cfg(steps=10, dc_trajectories=4)
    man = collect_cdc(tiny, cfg, tmp_path)
    assert man["kind"] == "c_dc" and man["fingerprint"] == tiny.fingerprint and man["eta"] == 1.0
    assert man["per_step_counts"] == {str(s): 1 for s in range(0, 10, 2)} and man["count"] == 5
    assert {"x0_pred", "model_output", "sample"} <= set(man["fields"])
    assert "x0" in man["fields"]["x0_pred"]["description"] and "z_t" in man["fields"]["sample"]["description"]
    r = open_set(tmp_path, "c_dc").load_all()
    grid = ddim_timesteps(tiny.scheduler_config, 10)
    assert r["step_index"].tolist() == [0, 2, 4, 6, 8]
    assert torch.equal(r["timestep"], grid[0::2]) and r["student_step_index"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(grid[0::2], ddim_timesteps(tiny.scheduler_config, 5))  # = the student's grid
    assert ((r["trajectory"] >= 0) & (r["trajectory"] < 4)).all()
    # the stored targets are the FP model's own outputs at the stored inputs
    with torch.no_grad():
        eps = tiny.unet(r["sample"], r["timestep"]).sample
    torch.testing.assert_close(r["model_output"], eps, rtol=1e-4, atol=1e-5)
    x0 = predicted_x0(tiny.scheduler_config, 10, r["sample"], r["timestep"], eps)
    torch.testing.assert_close(r["x0_pred"], x0, rtol=1e-4, atol=1e-5)
    assert r["x0_pred"].abs().max() <= 1.0  # clip_sample=True in the tiny model's schedule


def test_cdc_size_and_calibrate_layout(tiny, tmp_path):
    cfg = _cfg(steps=8, dc_size=6, dc_trajectories=3)
    out = calibrate(tiny, cfg, tmp_path)
    assert out["c_dc"]["per_step_counts"] == {"0": 2, "2": 1, "4": 2, "6": 1}
    assert dc_counts(CalibConfig(steps=100, dc_size=5)) == {0: 1, 20: 1, 40: 1, 60: 1, 80: 1}
    assert sum(dc_counts(CalibConfig(steps=100, dc_size=100)).values()) == 100
    assert open_set(tmp_path, "c_qc").kind == "c_qc" and len(open_set(tmp_path, "c_dc")) == 6
    assert calibrate(tiny, _cfg(with_dc=False), tmp_path / "x")["c_dc"] is None


# ---------------------------------------------------------------------------------------------- TDAC
def test_tdac_picks_highest_scores_constructed():
    # 6 candidates: 0-3 form a tight cluster (dense), 4 and 5 are outliers; spread is highest for 5, then 1.
    pooled = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [5.0, 5.0], [-6.0, 4.0]])
    spread = torch.tensor([0.1, 0.8, 0.2, 0.1, 0.3, 1.0])
    feats = {"pooled": pooled, "spread": spread}
    score, density, variety = tdac_scores(pooled, spread, 1.0)
    assert set(torch.argsort(density, descending=True)[:4].tolist()) == {0, 1, 2, 3}
    rng = np.random.default_rng(0)
    cands = np.arange(6)
    dens_only = TDAC(CalibConfig(strategy="tdac", tdac_density_weight=1.0))
    assert set(dens_only.select(0, 2, cands, feats, rng).tolist()) <= {0, 1, 2, 3}
    var_only = TDAC(CalibConfig(strategy="tdac", tdac_density_weight=0.0))
    assert var_only.select(0, 2, cands, feats, rng).tolist() == [1, 5]
    both = TDAC(CalibConfig(strategy="tdac", tdac_density_weight=0.5))
    score, _, _ = tdac_scores(pooled, spread, 0.5)
    picked = both.select(0, 3, cands, feats, rng)
    assert picked.tolist() == sorted(torch.topk(score, 3).indices.tolist())
    assert 1 in picked.tolist()  # dense and high-variety beats both single-criterion candidates
    assert all(score[i] >= score[j] for i in picked for j in set(range(6)) - set(picked.tolist()))


def test_tdac_collect_keeps_top_candidates(tiny, tmp_path):
    cfg = _cfg(strategy="tdac", n_per_step=2, every_k=3, tdac_candidates=3)
    strat = get_strategy(cfg)
    assert strat.n_trajectories(6) == 6
    man = collect_cqc(tiny, cfg, tmp_path)
    assert man["per_step_counts"] == {"0": 2, "3": 2} and man["n_trajectories"] == 6
    rows = open_set(tmp_path).load_all()
    # recompute the scores of all 6 candidates at step 3 with a mid-block hook and compare the choice
    seen = {}
    ddim_sample(TorchUNet(tiny.unet), tiny.scheduler_config, tiny.sample_shape, 6,
                SamplerConfig(steps=6, batch_size=6, seed=cfg.seed),
                on_step=lambda i, t, x, c: seen.__setitem__(i, (t.clone(), x.clone())))
    feats = {}
    h = tiny.unet.mid_block.register_forward_hook(lambda m, a, o: feats.update(TDAC.featurize(o)))
    with torch.no_grad():
        tiny.unet(seen[3][1], seen[3][0])
    h.remove()
    score, _, _ = tdac_scores(feats["pooled"], feats["spread"], cfg.tdac_density_weight)
    want = sorted(torch.topk(score, 2).indices.tolist())
    assert sorted(rows["trajectory"][rows["step_index"] == 3].tolist()) == want


@pytest.mark.parametrize("patch", [{"shards": [{"file": "../x", "count": 20}]}, {"count": 3}, {"kind": "c_xx"},
                                   {"format_version": 99}, {"fields": {"sample": 1}}])
def test_manifest_validation(tmp_path, patch):
    write_set(tmp_path, "c_qc", _rows(), META, shard_size=8)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m.update(patch)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PqcadError, match="calibration manifest"):
        open_set(tmp_path)


def test_run_trajectories_ids_follow_batches(tiny):
    from calibration import run_trajectories

    calls = []
    zero = lambda x, t, c=None: torch.zeros_like(x)  # noqa: E731  (a stand-in driver: no UNet needed here)
    out = run_trajectories(tiny, 5, 3, 0.0, 0, 2, "cpu", None,
                           lambda i, t, x, c, o, ids: calls.append((i, ids.tolist(), x.shape[0])), unet_fn=zero)
    assert out.shape == (5, *tiny.sample_shape)
    assert calls == [(i, ids, len(ids)) for ids in ([0, 1], [2, 3], [4]) for i in range(3)]
