"""Progressive Quantization: the Alg. 3 detector, the tau -> kappa transition, PQ vs direct, bit-shrinking."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_quantize_recon import collect, small_cfg

from pqcad_export.model_io import load_model
from pqcad_export.quantize import PQConfig, load_quantized, quantize_model, save_quantized
from pqcad_export.quantize.bitshrink import stage_bits
from pqcad_export.quantize.blocks import Unit
from pqcad_export.quantize.layers import QuantLinear
from pqcad_export.quantize.progressive import TransitionDetector, delta_pert, plot_loss_curve, tau_bits
from pqcad_export.quantize.quantizers import mse_channel_scale
from pqcad_export.quantize.capture import Captured
from pqcad_export.quantize.unit_optimizer import UnitContext


# ---- Alg. 3 detector -------------------------------------------------------------------------------------------
def test_detector_fires_on_plateau_exactly_when_window_fills():
    det = TransitionDetector(pi=0.04, beta=0.9, eps=1e-8, window=50)
    rng = random.Random(0)
    fired = [det.update(1.0 + 0.001 * rng.random()) for _ in range(80)]
    assert not any(fired[:49])  # never before the window is full
    assert fired[49] and det.fired_at == 49


def test_detector_does_not_fire_on_steep_decline():
    det = TransitionDetector(pi=0.04, beta=0.9, window=50)
    assert not any(det.update(10.0 * math.exp(-0.05 * i)) for i in range(400))


def test_detector_does_not_fire_before_window_even_if_flat():
    det = TransitionDetector(window=500)
    assert not any(det.update(1.0) for _ in range(499))
    assert det.update(1.0)


def test_detector_momentum_arithmetic_matches_alg3():
    rng = random.Random(1)
    losses = [rng.uniform(0.5, 2.0) for _ in range(60)]
    W, beta, pi, eps = 7, 0.9, 0.04, 1e-8
    det = TransitionDetector(pi=pi, beta=beta, eps=eps, window=W)
    G = None
    for i, loss in enumerate(losses):
        fired = det.update(loss)
        G = loss if G is None else beta * G + (1 - beta) * loss
        win = losses[max(0, i - W + 1): i + 1]
        l_avg = sum(win) / len(win)
        rate = abs(l_avg - G) / max(l_avg, eps)
        assert det.G == G and det.rate == pytest.approx(rate, abs=1e-15)
        assert fired == (len(win) == W and rate < pi)


# ---- transition: kappa quantizer from the tau-optimised soft weights ------------------------------------------------
def test_transition_initialises_kappa_from_soft_tau_weights():
    torch.manual_seed(0)
    fp = torch.nn.Linear(16, 8)
    model = torch.nn.Sequential(QuantLinear(fp, 4, 8, act_quant=False))
    x = torch.randn(64, 16)
    ctx = UnitContext(model, Unit("0", "0", "0", ["0"]), Captured([((x,), {})]), fp(x).detach(), None,
                      small_cfg(iters=30), torch.device("cpu"), seed=0)
    layer = model[0]
    w0 = layer.w_fp.clone()
    ctx.init_weights([tau_bits(4)])
    assert layer.weight_bits == 8
    with torch.enable_grad():
        ctx.segment(30, regularize=True)
    d8 = layer.wq.delta.view(-1, 1)
    soft = layer.wq.integers(layer.w_fp, "soft") * d8
    assert not torch.equal(soft, w0)
    ctx.transition([4], "detector")
    assert layer.weight_bits == 4 and torch.equal(layer.w_fp, soft)
    assert torch.equal(layer.wq.delta, mse_channel_scale(soft, 4))
    assert ctx.events[-1]["reason"] == "detector"


def test_bitshrink_stages():
    assert stage_bits([4]) == [[8], [7], [6], [5], [4]]
    assert stage_bits([4, 8], 3) == [[8, 16], [6, 12], [4, 8]]


def test_delta_pert_is_geomean_improvement():
    a = {"units": [{"name": "x", "pert": 1.0}, {"name": "y", "pert": 4.0}]}
    b = {"units": [{"name": "x", "pert": 2.0}, {"name": "y", "pert": 8.0}]}
    assert delta_pert(a, b) == pytest.approx(0.5)


# ---- PQ on a tiny UNet ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny_attn_unet_dir):
    torch.set_num_threads(1)
    lm = load_model(tiny_attn_unet_dir)
    batches = collect(lm)
    cfg = small_cfg(iters=160, act_iters=10, pq=PQConfig(window=20))
    return lm, batches, {m: quantize_model(lm, batches, "w4a8", m, cfg) for m in ("direct", "pq")}


@pytest.mark.slow
def test_pq_logs_transition_and_saves_exactly(runs, tmp_path):
    lm, batches, res = runs
    pq = res["pq"]
    for u in pq.log["units"]:
        if not u["layers"]:
            continue
        assert u["bits_start"] == [tau_bits(b) for b in u["bits_final"]]
        assert 0 < u["transition_iter"] < 160 and u["transition"] in ("detector", "forced")
        assert u["loss_tau"] is not None and u["loss_kappa_start"] is not None and u["pert"] > 0
    save_quantized(pq, tmp_path)
    q2 = load_quantized(tmp_path)
    x, t = batches[0]["sample"], batches[0]["timestep"]
    with torch.no_grad():
        assert torch.equal(pq(x, t), q2(x, t))
    assert q2.method == "pq" and q2.log["units"][0]["name"] == pq.log["units"][0]["name"]
    assert plot_loss_curve(pq.log, tmp_path / "curve.png") and (tmp_path / "curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_forced_transition_is_logged(tiny_unet_dir):
    lm = load_model(tiny_unet_dir)
    cfg = small_cfg(iters=20, act_iters=0, max_calib=16, pq=PQConfig(pi=0.0, window=5, force_fraction=0.25))
    qm = quantize_model(lm, collect(lm, n=4, steps=4), "w4a8", "pq", cfg)
    for u in qm.log["units"]:
        if u["layers"]:
            assert u["transition"] == "forced" and u["transition_iter"] == 5
            assert any("forced" in e.get("note", "") for e in u["events"])


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="PQ does not beat direct AdaRound at equal iterations here: the tau=8 "
                   "stage starts on its plateau (soft rounding initialised at the FP weights), the detector fires "
                   "as soon as its window fills, and those iterations are lost to the kappa stage; the tau stage "
                   "can move a weight by at most one 8-bit step (median 0.07 of a 4-bit step on the teacher). "
                   "See the quantization report.")
def test_pq_lower_geomean_perturbation_than_direct_at_equal_iterations(runs):
    _, _, res = runs
    d, p = res["direct"].log, res["pq"].log
    assert d["config"]["iters"] == p["config"]["iters"]
    assert p["geomean_pert"] < d["geomean_pert"], (p["geomean_pert"], d["geomean_pert"], delta_pert(p, d))


@pytest.mark.slow
def test_bitshrink_runs_and_logs_cycles(tiny_unet_dir):
    lm = load_model(tiny_unet_dir)
    qm = quantize_model(lm, collect(lm, n=4, steps=4), "w4a8", "bitshrink",
                        small_cfg(iters=25, act_iters=0, max_calib=16))
    u = next(u for u in qm.log["units"] if u["layers"] and 4 in u["bits_final"])
    assert u["stages"][0] == [8] * len(u["bits_final"]) and u["stages"][-1] == u["bits_final"]
    assert len(u["stage_starts"]) == 5
