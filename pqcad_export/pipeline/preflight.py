"""Checks `build` runs before its first stage (after BuildConfig.validate's option checks): the stage configs
can be built, the model loads, its conditioning and scheduler grid are usable and its forward pass is finite."""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..model_io import LoadedModel, check_finite, load_model, student_scheduler_config


def dry_stage_configs(cfg) -> None:
    """Build the calibration and CAD configs once, so a bad strategy, loss or budget override is refused
    before the first stage rather than when its stage starts."""
    from calibration.config import CalibConfig
    from calibration.strategies import STRATEGIES

    from ..distill.config import CadConfig

    if cfg.calib_strategy not in STRATEGIES:
        raise UsageError(f"unknown --calib-strategy '{cfg.calib_strategy}': expected one of "
                         f"{', '.join(STRATEGIES)}")
    over = cfg.overrides or {}
    pcr = {"pcr_bits": cfg.bits} if cfg.calib_strategy == "pcr" else {}
    CalibConfig.preset(cfg.preset, steps=cfg.teacher_steps, strategy=cfg.calib_strategy, seed=cfg.seed,
                       **{**pcr, **over.get("calib", {})})
    CadConfig.preset(cfg.preset, calib_loss=cfg.calib_loss, lam=cfg.lam, kd_teacher=cfg.kd_teacher,
                     seed=cfg.seed, teacher_steps=cfg.teacher_steps, **over.get("student", {}))


def load_teacher(cfg, device: torch.device, reaches_student: bool) -> LoadedModel:
    """The FP teacher with its conditioning (`.cond`), refused (one line) when CAD could not halve its grid or a
    probe batch gives NaN/inf."""
    from ..conditioning import resolve_conditioning

    teacher = load_model(cfg.model, device)
    teacher.cond = resolve_conditioning(teacher, cfg.cond)
    if reaches_student:  # CAD can halve this grid, or the one-line fix
        student_scheduler_config(teacher.scheduler_config, cfg.teacher_steps)
    check_finite(teacher, None if teacher.cond is None else teacher.cond.rows(2))
    return teacher
