"""CAD hyper-parameters (`CadConfig.preset("quick" | "paper")`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config_base import ConfigBase, Preset, choices, require
from .choices import CalibLoss, CdcSpace, KdTarget, KdTeacher, KdWeighting, LrDecay


@dataclass
class CadConfig(ConfigBase):
    """Calibration-Assisted Distillation (arXiv 2506.16776 Alg. 4, loss Eq. (8)).

    Paper-scale defaults follow progressive distillation on CIFAR-10 (Salimans & Ho 2022: Adam, batch 128,
    truncated-SNR weighting, learning rate annealed linearly to 0, tens of thousands of updates per halving);
    PQCAD does not publish its CAD optimiser settings, so the values marked "chosen" are ours.
    """

    iters: int = 20_000             # student updates (chosen: one halving 100 -> 50 of a quantized teacher)
    batch_size: int = 128           # training images per update (Salimans & Ho)
    lr: float = 5e-5                # Adam lr of the grid latents, biases and norms (chosen, linear decay to 0)
    lr_act: float = 1e-4            # Adam lr of the LSQ activation step sizes (chosen)
    lr_decay: str = LrDecay.LINEAR.value  # linear | constant
    grad_clip: float = 1.0          # global grad-norm clip (0 = off)
    kd_target: str = KdTarget.SAMPLER.value  # KD error: sampler = the student's clipped DDIM step vs the teacher's
    #                                 z_t'' (rescaled; equals Eq. (8)'s x-error when nothing is clipped) | x = Eq. (8)
    kd_weighting: str = KdWeighting.TRUNCATED_SNR.value  # w(lambda_t) of Eq. (8): truncated_snr = max(SNR,1) |
    #                                 snr (= eps MSE)
    kd_teacher: str = KdTeacher.QUANTIZED.value  # whose two DDIM steps the student learns: quantized = the PQ model
    #                                 (Alg. 4) | fp = the FP model it was made from (the student stays quantized)
    calib_loss: str = CalibLoss.EM.value  # em | swd | kl | jsd | cos | none (second term of Eq. (8))
    lam: float = 1.0                # lambda of Eq. (8) (chosen: both terms are per-element squared x-space
    #                                 errors, so 1 weighs them alike where w(lambda_t)=SNR; the log has both)
    cdc_batch: int = 32             # C_DC rows of the matching step per update (all of them when fewer)
    cdc_space: str = CdcSpace.X0.value  # x0: student x0-prediction vs C_DC "x0_pred"; eps: vs "model_output"
    swd_projections: int = 128      # projections of the sliced-Wasserstein variant
    teacher_steps: int = 100        # the quantized teacher's DDIM steps; the student gets half
    n_train_images: int = 5_000     # data-free: FP 100-step samples drawn once (or a dataset's first N)
    dataset: Optional[str] = None   # None = data-free (FP samples); else a path for pqcad_export.data.load_images
    train_fp_params: bool = True    # also train biases / norm affine params (FP in the engine)
    train_act_scales: bool = True   # LSQ activation steps stay trainable (Alg. 4 keeps the quantizers)
    eval_images: int = 16           # fixed held-in batch for the before/after loss of the log
    eval_steps: int = 4             # student steps (spread over the grid) the eval loss averages
    gap_samples: int = 64           # images for the 50-step-student vs 100-step-teacher/FP sample MSE in the log
    checkpoint_every: int = 500     # iterations between atomic checkpoints (resume point)
    log_every: int = 50
    seed: int = 0

    # paper: the defaults above. quick: ~2-3 min on a 2-core CPU for the built-in 2.2M-param teacher.
    PRESETS = {Preset.QUICK.value: dict(iters=150, batch_size=4, lr=1e-4, lr_act=1e-4, cdc_batch=8, swd_projections=32,
                                        n_train_images=16, eval_images=8, eval_steps=4, gap_samples=4,
                                        checkpoint_every=40, log_every=10),
               Preset.PAPER.value: {}}
    OPTIONS = "distillation"

    def validate(self) -> None:
        def one_of(value: str, enum_cls, option: str) -> None:
            require(value in choices(enum_cls), f"{option} must be {' or '.join(choices(enum_cls))}, got {value}")

        require(self.calib_loss in choices(CalibLoss), f"unknown --calib-loss '{self.calib_loss}': expected one of "
                                                       f"{', '.join(choices(CalibLoss))}")
        require(self.iters >= 0, f"--iters must be >= 0, got {self.iters}")
        require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        require(self.lam >= 0, f"--lambda must be >= 0, got {self.lam}")
        require(self.lr > 0 and self.lr_act >= 0, "learning rates must be positive")
        one_of(self.lr_decay, LrDecay, "lr_decay")
        one_of(self.kd_target, KdTarget, "kd_target")
        one_of(self.kd_teacher, KdTeacher, "--kd-teacher")
        one_of(self.kd_weighting, KdWeighting, "kd_weighting")
        one_of(self.cdc_space, CdcSpace, "cdc_space")
        require(self.teacher_steps >= 2 and self.teacher_steps % 2 == 0,
                f"teacher steps must be even and >= 2, got {self.teacher_steps}")
        require(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint/log intervals must be >= 1")
        require(self.n_train_images >= 1 and self.cdc_batch >= 1, "image / C_DC counts must be >= 1")
