"""Checks `build` runs before its first stage (after BuildConfig.validate's option checks): the stage configs
can be built, the model loads, its conditioning and scheduler grid are usable and its forward pass is finite."""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..model_io import LoadedModel, check_finite, load_model, student_scheduler_config


def dry_stage_configs(cfg, bits) -> None:
    """Build the stage configs once (stage_configs.py, what the stages then run with), so a bad strategy, loss or
    budget override is refused before the first stage rather than when its stage starts."""
    from calibration.strategies import STRATEGIES

    from .stage_configs import stage_configs

    if cfg.calib.strategy not in STRATEGIES:
        raise UsageError(f"unknown --calib-strategy '{cfg.calib.strategy}': expected one of "
                         f"{', '.join(STRATEGIES)}")
    stage_configs(cfg, bits)


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
