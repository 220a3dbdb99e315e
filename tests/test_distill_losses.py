"""CAD calibration losses (pqcad_export.distill.losses) and the distillation target (distill.targets)."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from diffusers import DDIMScheduler

from pqcad_export.distill.losses import LOSSES, calibration_loss, em_distance, sliced_wasserstein
from pqcad_export.distill.targets import (Schedule, distillation_target, prev_timestep, student_grid,
                                          x_from_two_steps)
from pqcad_export.errors import PqcadError, UsageError
from pqcad_export.model_io import DEFAULT_SCHEDULER_CONFIG

SCHED = dict(DEFAULT_SCHEDULER_CONFIG)


@pytest.mark.parametrize("n,m", [(5, 5), (6, 9)])
def test_em_equals_pot_and_has_gradients(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    x = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.randn(m, 2, 3, 3, generator=g, dtype=torch.float64) + 0.5
    got = em_distance(x, y)
    xs, ys = x.detach().reshape(n, -1).numpy(), y.reshape(m, -1).numpy()
    cost = ((xs[:, None, :] - ys[None, :, :]) ** 2).sum(-1) / xs.shape[1]
    want = ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), cost)
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    (grad,) = torch.autograd.grad(got, x)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    # moving the student set towards the target lowers the distance
    with torch.no_grad():
        assert float(em_distance(x - 1e-2 * grad.sign(), y)) < float(got)


def test_em_is_permutation_invariant_and_zero_on_identical_sets():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1, 4, 4, generator=g)
    assert float(em_distance(x, x[torch.randperm(7, generator=g)])) == pytest.approx(0.0, abs=1e-6)


def test_sliced_wasserstein_matches_pot_and_is_seeded():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 1, 4, 4, generator=g).requires_grad_(True)
    y = torch.randn(48, 1, 4, 4, generator=g) * 2
    a = sliced_wasserstein(x, y, 32, torch.Generator().manual_seed(5))
    b = sliced_wasserstein(x, y, 32, torch.Generator().manual_seed(5))
    assert float(a.detach()) == float(b.detach()) > 0
    state = torch.get_rng_state()
    sliced_wasserstein(x, y, 32, torch.Generator().manual_seed(6))
    assert torch.equal(state, torch.get_rng_state()), "must not touch torch's global RNG"
    (grad,) = torch.autograd.grad(a, x)
    assert grad.abs().sum() > 0
    # same order of magnitude as the exact per-element W2^2 on isotropic data (a lower-bound-like estimate)
    assert 0 < float(a.detach()) <= float(em_distance(x.detach(), y)) * 1.5


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_zero_on_identical_and_finite_otherwise(name):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 5, 5, generator=g)
    y = torch.randn(4, 1, 5, 5, generator=g) * 0.5 + 0.3
    f = calibration_loss(name, generator=torch.Generator().manual_seed(0))
    assert float(f(x, x)) == pytest.approx(0.0, abs=1e-5)
    xr = x.clone().requires_grad_(True)
    v = f(xr, y)
    assert torch.isfinite(v) and float(v.detach()) >= 0
    if name != "none":
        assert float(v.detach()) > 1e-4
        (grad,) = torch.autograd.grad(v, xr)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # a single constant-valued sample (degenerate histogram support) is still finite
    c = torch.ones(1, 1, 5, 5)
    assert torch.isfinite(f(c, c)) and torch.isfinite(f(c, y))


def test_unknown_loss_and_shape_mismatch_are_usage_errors():
    with pytest.raises(UsageError):
        calibration_loss("wasserstein9")
    with pytest.raises(UsageError):
        em_distance(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# grid and target
# ---------------------------------------------------------------------------------------------------------------
def test_student_grid_is_every_other_teacher_point_of_diffusers_ddim():
    teacher, student = student_grid(SCHED, 100)
    s100, s50 = DDIMScheduler.from_config(SCHED), DDIMScheduler.from_config(SCHED)
    s100.set_timesteps(100)
    s50.set_timesteps(50)
    assert torch.equal(teacher, s100.timesteps) and torch.equal(student, s50.timesteps)
    assert torch.equal(teacher[0::2], student) and len(student) == 50
    # two teacher steps from a student point land on the student's next point (the last on the final one: -1)
    t = student.clone()
    t2 = prev_timestep(prev_timestep(t, 1000, 100), 1000, 100)
    assert torch.equal(t2, prev_timestep(t, 1000, 50))
    assert torch.equal(t2[:-1], student[1:]) and int(t2[-1]) == -1


def test_leading_spacing_that_breaks_alignment_is_refused():
    bad = dict(SCHED, timestep_spacing="linspace")
    with pytest.raises(PqcadError, match="trailing"):
        student_grid(bad, 100)


def test_own_ddim_step_equals_diffusers_step():
    sched = Schedule.from_config(SCHED)
    ref = DDIMScheduler.from_config(SCHED)
    ref.set_timesteps(100)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 1, 4, 4, generator=g)
    eps = torch.randn(3, 1, 4, 4, generator=g)
    for t in (999, 509, 9):
        tt = torch.full((3,), t)
        mine, _ = sched.ddim_step(eps, z, tt, prev_timestep(tt, 1000, 100))
        want = ref.step(eps, t, z, eta=0.0).prev_sample
        assert torch.allclose(mine, want, atol=1e-5, rtol=1e-5), t


@pytest.mark.parametrize("clip", [False, True])
def test_target_of_linear_teacher_reproduces_two_teacher_steps(clip):
    """eps_theta(z, t) = a_t * z (exactly linear): one 50-step diffusers DDIM step with the student output implied
    by x_tilde lands exactly on the result of two 100-step diffusers DDIM steps of the teacher."""
    cfg = dict(SCHED, clip_sample=clip)
    sched = Schedule.from_config(cfg)
    coef = torch.linspace(0.3, 0.9, 1000, dtype=torch.float64)

    def teacher(z, t):
        return coef[t.long()].to(z).reshape(-1, 1, 1, 1) * z

    s100 = DDIMScheduler.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    s100.set_timesteps(100)
    s50 = DDIMScheduler.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    s50.set_timesteps(50)
    g = torch.Generator().manual_seed(7)
    _, student = student_grid(cfg, 100)
    for t in (int(student[5]), int(student[30]), int(student[-1])):
        z = 0.3 * torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
        tt = torch.full((4,), t)
        x_tilde, z2, t2 = distillation_target(teacher, sched, z, tt, 100)
        # the reference: diffusers' own scheduler, two teacher steps
        z1_ref = s100.step(teacher(z, tt), t, z).prev_sample
        z2_ref = s100.step(teacher(z1_ref, tt - 10), t - 10, z1_ref).prev_sample
        assert torch.allclose(z2, z2_ref, atol=1e-9)
        # one student step (diffusers, 50-step schedule) with the eps that implies x_tilde
        eps_student = sched.from_x0(x_tilde, z, tt)
        if clip and x_tilde.abs().max() > 1:
            continue  # the sampler would clip x_tilde; exactness only holds inside the clip range
        z2_student = s50.step(eps_student, t, z).prev_sample
        assert torch.allclose(z2_student, z2_ref, atol=1e-8), t
        assert torch.allclose(x_from_two_steps(sched, z, tt, z2_ref, t2), x_tilde)


def test_prediction_type_conversions_round_trip():
    g = torch.Generator().manual_seed(8)
    z, x0 = torch.randn(2, 1, 3, 3, generator=g), torch.randn(2, 1, 3, 3, generator=g)
    t = torch.tensor([100, 800])
    for ptype in ("epsilon", "sample", "v_prediction"):
        sched = Schedule.from_config(dict(SCHED, prediction_type=ptype))
        out = sched.from_x0(x0, z, t)
        back, _ = sched.to_x0_eps(out, z, t)
        assert torch.allclose(back, x0, atol=1e-5), ptype


def test_truncated_snr_weight():
    sched = Schedule.from_config(SCHED)
    w = sched.truncated_snr_weight(torch.tensor([999, 500, 9, -1]))
    assert float(w[0]) == 1.0 and float(w[1]) == 1.0  # low SNR -> truncated to 1
    assert float(w[2]) > 100  # high SNR kept
    assert torch.isfinite(w).all()
