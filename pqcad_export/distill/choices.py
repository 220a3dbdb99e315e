"""CAD's choice sets as Enums: CadConfig validates against them and the CLI derives its click choices from them.
Kept free of torch / POT imports so that the CLI can read them without loading the distillation code."""

from __future__ import annotations

from enum import Enum


class CalibLoss(str, Enum):
    """D of Eq. (8): the distance between the student's outputs and C_DC (losses.py)."""

    EM = "em"
    SWD = "swd"
    KL = "kl"
    JSD = "jsd"
    COS = "cos"
    NONE = "none"


class KdTeacher(str, Enum):
    """Whose two DDIM steps the student learns: the quantized teacher (Alg. 4) or the FP model it was made from."""

    QUANTIZED = "quantized"
    FP = "fp"


class KdTarget(str, Enum):
    """KD error: the student's clipped DDIM step vs the teacher's z_t'' (sampler), or Eq. (8) as is (x)."""

    SAMPLER = "sampler"
    X = "x"


class KdWeighting(str, Enum):
    """w(lambda_t) of Eq. (8): max(SNR, 1), or SNR (the eps-space MSE)."""

    TRUNCATED_SNR = "truncated_snr"
    SNR = "snr"


class CdcSpace(str, Enum):
    """What the calibration term compares: x0-predictions (C_DC `x0_pred`) or raw outputs (`model_output`)."""

    X0 = "x0"
    EPS = "eps"


class LrDecay(str, Enum):
    LINEAR = "linear"
    CONSTANT = "constant"
