"""The distill (CAD) stage, once: quantized 100-step teacher + C_DC -> 50-step quantized student dir.
`pqcad-export distill`, `build` and research all call `run_distill`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from ..errors import UsageError
from .cad import distill
from .config import CadConfig
from .files import LOG


@dataclass
class Distilled:
    student: Any            # quantize.QuantizedModel, steps = teacher steps / 2
    log: dict[str, Any]     # cad_log.json as written (resumed_from, eval_before/after, sample_gap_mse, ...)


def _cond_from_file(quantized, path: str, device):
    """A --cond file for a conditional quantized UNet (the teacher is loaded here to read its attention width)."""
    from ..conditioning import cross_attention_dim, load_conditioning
    from ..quantize import load_quantized

    if isinstance(quantized, (str, Path)):
        quantized = load_quantized(quantized, device)
    if not quantized.is_conditional:
        raise UsageError("--cond given but the quantized UNet is unconditional")
    return quantized, load_conditioning(path, cross_attention_dim(quantized.unet))


def run_distill(quantized, calib, cfg: CadConfig, out_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
                *, fp_model=None, cond=None, quiet: bool = True) -> Distilled:
    """Distill `quantized` (QuantizedModel or its directory) with C_DC from `calib` into `out_dir`.

    `cond`: a conditioning.Conditioning, a --cond file path, or None (a conditional UNet then gets the labelled
    default); `fp_model`: the FP model (directory, LoadedModel or UNet) for data-free images and --kd-teacher fp.
    Resumes from out_dir's checkpoint when one of the same configuration is there."""
    if isinstance(cond, (str, Path)):
        quantized, cond = _cond_from_file(quantized, str(cond), device)
    student = distill(quantized, calib, cfg, out_dir, device, fp_model=fp_model, quiet=quiet, cond=cond)
    return Distilled(student, json.loads((Path(out_dir) / LOG).read_text()))
