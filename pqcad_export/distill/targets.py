"""Student grid and the progressive-distillation target (Salimans & Ho 2022, Alg. 2; arXiv 2506.16776 Alg. 4).

Notation (variance preserving): z_t = alpha_t x + sigma_t eps with alpha_t = sqrt(abar_t), sigma_t = sqrt(1-abar_t)
from the scheduler's alphas_cumprod; "t = -1" is the end of sampling and uses the scheduler's final_alpha_cumprod
(1 with set_alpha_to_one), exactly as diffusers' DDIMScheduler.step does.

The teacher takes two DDIM (eta=0) steps t -> t' -> t'' on the teacher grid; the student must land on the same
z_t'' in one DDIM step t -> t''. Solving the student's DDIM step
    z_t'' = alpha_t'' x + (sigma_t''/sigma_t) (z_t - alpha_t x)
for x gives the target
    x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t).
The teacher's steps reproduce DDIMScheduler.step (including clip_sample on x0), so the target matches what the
100-step sampler really does. The student is trained in x-space with the truncated-SNR weight
w(lambda_t) = max(SNR_t, 1), SNR_t = alpha_t^2 / sigma_t^2 ("truncated SNR" weighting of Salimans & Ho).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..errors import PqcadError
from ..sampling import ddim_timesteps, make_scheduler

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # model_output = fn(z_t, t[B])


def student_grid(scheduler_config: dict[str, Any], teacher_steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher grid, student grid), descending; the student grid is every other point of the teacher's actual
    grid, which the student's scheduler config (model_io.student_scheduler_config) reproduces with teacher_steps/2
    steps. One-line error with the fix when the teacher grid cannot be halved (uneven `linspace` spacing...)."""
    from ..model_io import student_scheduler_config

    if teacher_steps % 2:
        raise PqcadError(f"teacher steps must be even to halve them, got {teacher_steps}")
    teacher = ddim_timesteps(scheduler_config, teacher_steps)
    student_scheduler_config(scheduler_config, teacher_steps)  # raises when no every-other-point grid exists
    return teacher, teacher[0::2].clone()


@dataclass
class Schedule:
    """alphas_cumprod of the scheduler plus its final value; vectorised alpha/sigma lookup with t=-1 = final."""

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    num_train_timesteps: int
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @classmethod
    def from_config(cls, scheduler_config: dict[str, Any]) -> "Schedule":
        s = make_scheduler(scheduler_config, 2)
        if s.config.thresholding:
            raise PqcadError("distillation does not support dynamic thresholding schedulers (thresholding=True)")
        return cls(s.alphas_cumprod.double().clone(), float(s.final_alpha_cumprod), s.config.num_train_timesteps,
                   s.config.prediction_type, bool(s.config.clip_sample), float(s.config.clip_sample_range))

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        t = t.long().cpu()
        table = torch.cat([self.alphas_cumprod, torch.tensor([self.final_alpha_cumprod], dtype=torch.float64)])
        return table[torch.where(t < 0, torch.full_like(t, len(self.alphas_cumprod)), t)]

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t shaped [B,1,1,1] (float64 math, cast to like.dtype)."""
        ab = self.abar(t)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return (ab.sqrt().reshape(shape).to(like), (1 - ab).sqrt().reshape(shape).to(like))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.abar(t)
        return ab / (1 - ab).clamp_min(1e-20)

    def truncated_snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(lambda_t) = max(SNR_t, 1) (Salimans & Ho 2022, Sec. 4)."""
        return self.snr(t).clamp_min(1.0).float()

    # --- conversions between the UNet's output and (x0, eps) ---------------------------------------------------
    def to_x0_eps(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.alpha_sigma(t, z)
        if self.prediction_type == "epsilon":
            return (z - s * out) / a, out
        if self.prediction_type == "sample":
            return out, (z - a * out) / s
        if self.prediction_type == "v_prediction":
            return a * z - s * out, a * out + s * z
        raise PqcadError(f"unsupported prediction_type {self.prediction_type!r}")

    def from_x0(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output (eps / x0 / v per prediction_type) that implies x0 at (z_t, t)."""
        a, s = self.alpha_sigma(t, z)
        eps = (z - a * x0) / s
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        return a * eps - s * x0  # v

    def ddim_step(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                  clip: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM eta=0 step, identical to DDIMScheduler.step (x0 clipped if clip_sample; eps not recomputed).

        Returns (z_prev, x0_pred)."""
        x0, eps = self.to_x0_eps(out, z, t)
        if self.clip_sample if clip is None else clip:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        a_p, s_p = self.alpha_sigma(t_prev, z)
        return a_p * x0 + s_p * eps, x0

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise


def prev_timestep(t: torch.Tensor, num_train_timesteps: int, steps: int) -> torch.Tensor:
    """The timestep DDIMScheduler.step goes to from t when sampling with `steps` steps (-1 = final)."""
    p = t - num_train_timesteps // steps
    return torch.where(p < 0, torch.full_like(p, -1), p)


def x_from_two_steps(sched: Schedule, z_t: torch.Tensor, t: torch.Tensor, z_tpp: torch.Tensor,
                     t_pp: torch.Tensor) -> torch.Tensor:
    """x_tilde such that one eta=0 DDIM step t -> t'' from z_t lands on z_t'' (module doc; no clipping)."""
    a, s = sched.alpha_sigma(t, z_t)
    a2, s2 = sched.alpha_sigma(t_pp, z_t)
    ratio = s2 / s
    return (z_tpp - ratio * z_t) / (a2 - ratio * a)


@torch.no_grad()
def distillation_target(teacher: EpsFn, sched: Schedule, z_t: torch.Tensor, t: torch.Tensor,
                        teacher_steps: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two teacher DDIM steps t -> t' -> t''; returns (x_tilde, z_t'', t'')."""
    t1 = prev_timestep(t, sched.num_train_timesteps, teacher_steps)
    if bool((t1 < 0).any()):
        raise PqcadError("distillation target needs two teacher steps: t is the teacher's last grid point")
    z1, _ = sched.ddim_step(teacher(z_t, t), z_t, t, t1)
    t2 = prev_timestep(t1, sched.num_train_timesteps, teacher_steps)
    z2, _ = sched.ddim_step(teacher(z1, t1), z1, t1, t2)
    return x_from_two_steps(sched, z_t, t, z2, t2), z2, t2
