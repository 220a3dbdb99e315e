"""Calibration-Assisted Distillation (CAD, arXiv 2506.16776 Alg. 4 / Eq. (8)): a quantized 50-step student from
the quantized 100-step teacher. `distill(...)` is what the build pipeline and `pqcad-export distill` call;
`distill_fp(...)` is the FP Distill-only baseline of the paper's tables (the same distillation, unquantized)."""

from .cad import CdcBank, CadResult, distill, distill_fp, load_cdc, run_cad, training_images
from .config import CadConfig
from .losses import LOSSES, calibration_loss, cosine_loss, em_distance, js_divergence, kl_divergence, \
    sliced_wasserstein
from .student import freeze_student, prepare_student
from .targets import Schedule, distillation_target, prev_timestep, student_grid, x_from_two_steps

__all__ = [
    "CadConfig", "CadResult", "CdcBank", "LOSSES", "Schedule", "calibration_loss", "cosine_loss", "distill",
    "distill_fp", "distillation_target", "em_distance", "freeze_student", "js_divergence", "kl_divergence", "load_cdc",
    "prepare_student", "prev_timestep", "run_cad", "sliced_wasserstein", "student_grid", "training_images",
    "x_from_two_steps",
]
