"""CAD's training loop object: KD batches, the Eq. (8) loss, the optimiser, evaluation and checkpoint state
(the driver that runs it is cad.run_cad)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..errors import PqcadError
from ..sampling import TorchUNet
from .cdc import CdcBank
from .config import CadConfig
from .losses import calibration_loss
from .student import prepare_student, trainable_groups
from .targets import Schedule, distillation_target, student_grid


@dataclass
class CadResult:
    student: nn.Module                       # frozen: weights back on the integer grid
    log: dict[str, Any] = field(default_factory=dict)


@dataclass
class KdBatch:
    """One KD batch at student timestep t: z_t, the target x_tilde and the teacher's two-step z_t'' at t''."""

    t: int
    z: torch.Tensor
    x_tilde: torch.Tensor
    z2: torch.Tensor
    t2: torch.Tensor
    c: Optional[torch.Tensor] = None   # encoder_hidden_states of the images (conditional UNets)


def kd_weight(sched: Schedule, t: int, weighting: str) -> float:
    """w(lambda_t) of Eq. (8): "truncated_snr" = max(SNR, 1); "snr" = SNR (x-space error x SNR = eps-space MSE)."""
    tt = torch.tensor([int(t)])
    if weighting == "truncated_snr":
        return float(sched.truncated_snr_weight(tt)[0])
    return float(sched.snr(tt)[0])


def _iter_generator(seed: int, it: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(it) * 7_919 + 12_345) % (2 ** 63 - 1))


class _Trainer:
    def __init__(self, teacher: nn.Module, scheduler_config: dict[str, Any], cdc: CdcBank, cfg: CadConfig,
                 images: torch.Tensor, device: torch.device, kd_unet: Optional[nn.Module] = None,
                 student_bits: Optional[int] = 8, cond=None):
        from ..model_io import student_scheduler_config

        self.cfg, self.device, self.cond = cfg, device, cond
        self.sched = Schedule.from_config(scheduler_config)
        self.scheduler_config = scheduler_config
        self.student_scheduler_config = student_scheduler_config(scheduler_config, cfg.teacher_steps)
        _, self.grid = student_grid(scheduler_config, cfg.teacher_steps)
        self.teacher = teacher.to(device).eval()
        self.teacher.requires_grad_(False)
        self.teacher_fn = TorchUNet(self.teacher)
        # the model whose two steps are the KD target: the quantized teacher (Alg. 4) or, kd_teacher=fp, the FP one
        self.kd_fn = self.teacher_fn
        if kd_unet is not None:
            self.kd_fn = TorchUNet(kd_unet.to(device).eval().requires_grad_(False))
        self.student = prepare_student(self.teacher, student_bits).to(device).eval()
        self.student_fn = TorchUNet(self.student)
        self.groups = trainable_groups(self.student, cfg.lr, cfg.lr_act, cfg.train_fp_params, cfg.train_act_scales)
        for g in self.groups:
            g["base_lr"] = g["lr"]
        self.opt = torch.optim.Adam(self.groups)
        self.cdc = cdc
        self.images = images.float()
        self.loss_gen = torch.Generator()
        self.calib = calibration_loss(cfg.calib_loss, n_projections=cfg.swd_projections, generator=self.loss_gen)

    # one forward pass of the student on the KD batch + the C_DC rows of the same step
    def losses(self, kb: "KdBatch", gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, sched, dev = self.cfg, self.sched, self.device
        t, z, x_tilde = kb.t, kb.z, kb.x_tilde
        rows = self.cdc.rows(t) if cfg.lam > 0 and cfg.calib_loss != "none" else None
        n_kd = z.shape[0]
        inp, cin = z, kb.c
        if rows is not None:
            k = rows["sample"].shape[0]
            sel = torch.randperm(k, generator=gen)[: cfg.cdc_batch] if k > cfg.cdc_batch else torch.arange(k)
            zc = rows["sample"][sel].to(dev)
            inp = torch.cat([z, zc])
            if cin is not None:
                if "encoder_hidden_states" not in rows:
                    raise PqcadError("C_DC has no 'encoder_hidden_states' field (needed by a conditional UNet)")
                cin = torch.cat([cin, rows["encoder_hidden_states"][sel].to(dev)])
        tt = torch.full((inp.shape[0],), int(t), dtype=torch.long, device=dev)
        out = self.student_fn(inp, tt, cin)
        x_hat, _ = sched.to_x0_eps(out[:n_kd], z, tt[:n_kd])
        w = float(kd_weight(sched, t, cfg.kd_weighting))
        if cfg.kd_target == "x":  # Eq. (8) literally: unclipped x-prediction vs x_tilde
            err = x_tilde - x_hat
        else:  # "sampler": the student's real (clipped) DDIM step t -> t'' vs the teacher's z_t'', rescaled by
            # c_t = alpha_t'' - (sigma_t''/sigma_t) alpha_t so it equals x_hat - x_tilde wherever nothing is clipped
            z2_hat, _ = sched.ddim_step(out[:n_kd], z, tt[:n_kd], kb.t2)
            a, s_ = sched.alpha_sigma(tt[:n_kd], z)
            a2, s2 = sched.alpha_sigma(kb.t2, z)
            err = (z2_hat - kb.z2) / (a2 - (s2 / s_) * a)
        kd = w * err.pow(2).mean()
        if rows is None:
            return kd + 0.0 * out.sum(), kd.detach(), torch.zeros(())
        oc = out[n_kd:]
        if cfg.cdc_space == "x0":
            if "x0_pred" not in rows:
                raise PqcadError("C_DC has no 'x0_pred' field (needed for cdc_space=x0)")
            pred, _ = sched.to_x0_eps(oc, zc, tt[n_kd:])
            if sched.clip_sample:
                pred = pred.clamp(-sched.clip_sample_range, sched.clip_sample_range)
            target = rows["x0_pred"][sel].to(dev)
        else:
            if "model_output" not in rows:
                raise PqcadError("C_DC has no 'model_output' field (needed for cdc_space=eps)")
            pred, target = oc, rows["model_output"][sel].to(dev)
        self.loss_gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        cal = self.calib(pred, target)
        return kd + cfg.lam * cal, kd.detach(), cal.detach()

    def batch(self, gen: torch.Generator, n: int, t: Optional[int] = None) -> "KdBatch":
        if t is None:
            t = int(self.grid[int(torch.randint(0, len(self.grid), (1,), generator=gen))])
        idx = torch.randint(0, self.images.shape[0], (n,), generator=gen)
        noise = torch.randn((n, *self.images.shape[1:]), generator=gen)
        x = self.images[idx].to(self.device)
        tt = torch.full((n,), t, dtype=torch.long, device=self.device)
        z = self.sched.q_sample(x, tt, noise.to(self.device))
        c = None if self.cond is None else self.cond.take(idx).to(self.device)
        x_tilde, z2, t2 = distillation_target(lambda zz, ttt: self.kd_fn(zz, ttt, c), self.sched, z, tt,
                                              self.cfg.teacher_steps)
        return KdBatch(t, z, x_tilde, z2, t2, c)

    def make_eval_set(self) -> list["KdBatch"]:
        """Fixed (t, z_t, x_tilde) batches at `eval_steps` grid points spread from high to low noise."""
        n = len(self.grid)
        k = max(1, min(self.cfg.eval_steps, n))
        picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
        out = []
        for j, s in enumerate(picks):
            g = torch.Generator().manual_seed(int(self.cfg.seed) * 31 + 977 + j)
            out.append(self.batch(g, min(self.cfg.eval_images, max(self.images.shape[0], 1)),
                                  int(self.grid[s])))
        return out

    @torch.no_grad()
    def evaluate(self, eval_set) -> dict[str, Any]:
        """Mean losses over the fixed eval batches, and the KD loss per timestep: with an eps-predicting UNet the
        x-space error of the noisiest step (t = 999: ~100 of a mean of ~25, GPU run 3) dominates the mean, so the
        per-step values are the ones to read."""
        tot = kd_s = cal_s = 0.0
        per_t: dict[str, float] = {}
        for j, kb in enumerate(eval_set):
            g = torch.Generator().manual_seed(int(self.cfg.seed) * 17 + 3 + j)
            loss, kd, cal = self.losses(kb, g)
            tot, kd_s, cal_s = tot + float(loss), kd_s + float(kd), cal_s + float(cal)
            per_t[str(kb.t)] = float(kd)
        m = max(len(eval_set), 1)
        return {"loss": tot / m, "kd": kd_s / m, "calib": cal_s / m, "kd_per_t": per_t}

    def step(self, it: int) -> dict[str, float]:
        cfg = self.cfg
        gen = _iter_generator(cfg.seed, it)
        kb = self.batch(gen, cfg.batch_size)
        t = kb.t
        frac = it / max(cfg.iters, 1)
        for g in self.opt.param_groups:  # (load_state_dict replaces the group dicts: never cache them)
            g["lr"] = g["base_lr"] * ((1.0 - frac) if cfg.lr_decay == "linear" else 1.0)
        self.opt.zero_grad(set_to_none=True)
        loss, kd, cal = self.losses(kb, gen)
        if not torch.isfinite(loss):
            raise PqcadError(f"CAD diverged: loss is {float(loss.detach())} at iteration {it} (t={t}); "
                             f"lower the learning rate or --lambda")
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if cfg.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not torch.isfinite(gn):
                raise PqcadError(f"CAD diverged: non-finite gradient at iteration {it} (t={t})")
        self.opt.step()
        return {"iter": it, "t": t, "loss": float(loss.detach()), "kd": float(kd), "calib": float(cal),
                "has_cdc": bool(self.cdc.rows(t) is not None)}

    @torch.no_grad()
    def sample_gap(self, refs: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        """MSE between the student's 50-step DDIM samples and reference 100-step samples of the same noise."""
        from ..sampling import SamplerConfig, ddim_sample

        seed = int(self.cfg.seed) + 9_001
        shape = tuple(self.images.shape[1:])
        x = ddim_sample(self.student_fn, self.student_scheduler_config, shape, n,
                        SamplerConfig(steps=self.cfg.teacher_steps // 2, batch_size=n, seed=seed), self.device,
                        cond=self._cond_rows(n))
        return {k: float((x - r).pow(2).mean()) for k, r in refs.items()}

    @torch.no_grad()
    def gap_references(self, n: int, fp_unet: Optional[nn.Module]) -> dict[str, torch.Tensor]:
        from ..sampling import SamplerConfig, ddim_sample

        seed = int(self.cfg.seed) + 9_001
        shape = tuple(self.images.shape[1:])
        sc = SamplerConfig(steps=self.cfg.teacher_steps, batch_size=n, seed=seed)
        c = self._cond_rows(n)
        refs = {"teacher_100": ddim_sample(self.teacher_fn, self.scheduler_config, shape, n, sc, self.device, cond=c)}
        if fp_unet is not None:
            refs["fp_100"] = ddim_sample(TorchUNet(fp_unet.to(self.device).eval()), self.scheduler_config, shape, n,
                                         sc, self.device, cond=c)
        return refs

    def _cond_rows(self, n: int) -> Optional[torch.Tensor]:
        return None if self.cond is None else self.cond.rows(n)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state(self, it: int, history: list, extra: dict) -> dict[str, Any]:
        return {"iter": it, "student": self.student.state_dict(), "opt": self.opt.state_dict(),
                "history": history, "extra": extra, "torch_rng": torch.get_rng_state()}

    def load(self, ck: dict[str, Any]) -> None:
        self.student.load_state_dict(ck["student"])
        self.opt.load_state_dict(ck["opt"])
        for g in self.opt.param_groups:  # Adam's load keeps our extra keys, but be explicit
            g.setdefault("base_lr", g["lr"])
        torch.set_rng_state(ck["torch_rng"])


def cad_trainer(teacher: nn.Module, scheduler_config: dict[str, Any], cdc: CdcBank, cfg: CadConfig,
                images: torch.Tensor, device: torch.device) -> _Trainer:
    """CAD's training loop object (KD batches, losses, optimiser) without running it: for studies of the loss."""
    return _Trainer(teacher, scheduler_config, cdc, cfg, images, device)
