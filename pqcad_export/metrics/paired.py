"""Paired image metrics: a candidate's sample i against the FP32 100-step sample i from the same initial noise.

Unlike FID/KID these need no distribution estimate, so they are stable at 100 samples and say directly how far
quantization + distillation moved each image. Pixels are uint8 scaled to [0, 1]:
  * mse per pair (also ranks the pairs that differ most, for the sample grid),
  * PSNR: mean over pairs of 10*log10(1 / mse), mse floored at 1e-12 (identical pairs count as 120 dB),
    the convention of tools/paired_metrics.py,
  * SSIM: torchmetrics' structural_similarity_index_measure (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
    data_range 1), mean over pairs; 3-channel images are scored per channel and averaged, as torchmetrics does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..errors import PqcadError
from .inception import ImagesLike, as_uint8_nchw

MSE_FLOOR = 1e-12


class PairedResult(NamedTuple):
    psnr: float
    ssim: float
    mse: float
    per_pair_mse: np.ndarray  # [N] float64


def _pair(a: ImagesLike, b: ImagesLike) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = as_uint8_nchw(a, "candidate images"), as_uint8_nchw(b, "reference images")
    if x.shape != y.shape:
        raise PqcadError(f"paired metrics need images of the same noise, same count and size: "
                         f"{tuple(x.shape)} vs {tuple(y.shape)}")
    return x.to(torch.float64) / 255.0, y.to(torch.float64) / 255.0


def pair_mse(a: ImagesLike, b: ImagesLike) -> np.ndarray:
    """Per-pair mean squared error on [0, 1] pixels, float64 [N]."""
    x, y = _pair(a, b)
    return ((x - y) ** 2).flatten(1).mean(1).numpy()


def psnr_from_mse(mse: np.ndarray) -> float:
    """Mean over pairs of the PSNR in dB (peak 1.0), each mse floored at MSE_FLOOR."""
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(np.asarray(mse, np.float64), MSE_FLOOR))))


def ssim(a: ImagesLike, b: ImagesLike) -> float:
    """Mean SSIM over pairs (torchmetrics, Gaussian 11x11 window); 1.0 for identical images."""
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:
        raise PqcadError("SSIM needs torchmetrics (pip install 'torchmetrics>=1.4,<2')") from None
    x, y = _pair(a, b)
    if min(x.shape[2:]) < 11:
        raise PqcadError(f"SSIM's 11x11 window needs images of at least 11x11 pixels, got {tuple(x.shape[2:])}")
    vals = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    return float(vals.mean())


def paired_metrics(candidate: ImagesLike, reference: ImagesLike) -> PairedResult:
    """PSNR, SSIM and MSE of candidate vs reference images (uint8 NCHW, same noise, same order)."""
    mse = pair_mse(candidate, reference)
    return PairedResult(psnr_from_mse(mse), ssim(candidate, reference), float(mse.mean()), mse)


def most_different(per_pair_mse: np.ndarray, k: int, among: int) -> list[int]:
    """Indices (< among) of the k pairs with the largest mse, largest first; pairs with mse 0 are never picked."""
    mse = np.asarray(per_pair_mse, np.float64)[:among]
    order = np.argsort(-mse, kind="stable")[:max(0, int(k))]
    return [int(i) for i in order if mse[i] > 0]
