"""CAD's choice sets as str Enums: CadConfig validates against them and the CLI derives its click choices from
them. Kept free of torch / POT imports so that the CLI can read them without loading the distillation code."""

from __future__ import annotations

from enum import Enum


def _choice_set(name: str, option: str, **members: str) -> type[Enum]:
    """A str Enum (members compare equal to their values), documented as the choices of `option`."""
    cls = Enum(name, members, type=str, module=__name__, qualname=name)
    cls.__doc__ = f"Choices of CadConfig's {option}."
    return cls


# D of Eq. (8): the distance between the student's outputs and C_DC (losses.py)
CalibLoss = _choice_set("CalibLoss", "--calib-loss", EM="em", SWD="swd", KL="kl", JSD="jsd", COS="cos", NONE="none")
# whose two DDIM steps the student learns: the quantized teacher (Alg. 4) or the FP model it was made from
KdTeacher = _choice_set("KdTeacher", "--kd-teacher", QUANTIZED="quantized", FP="fp")
# KD error: the student's clipped DDIM step vs the teacher's z_t'' (sampler), or Eq. (8) as is (x)
KdTarget = _choice_set("KdTarget", "kd_target", SAMPLER="sampler", X="x")
# w(lambda_t) of Eq. (8): max(SNR, 1), or SNR (the eps-space MSE)
KdWeighting = _choice_set("KdWeighting", "--kd-weighting", TRUNCATED_SNR="truncated_snr", SNR="snr")
# what the calibration term compares: x0-predictions (C_DC `x0_pred`) or raw outputs (`model_output`)
CdcSpace = _choice_set("CdcSpace", "cdc_space", X0="x0", EPS="eps")
# learning-rate schedule of the student's Adam
LrDecay = _choice_set("LrDecay", "lr_decay", LINEAR="linear", CONSTANT="constant")
