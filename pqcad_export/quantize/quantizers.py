"""Symmetric signed quantizers (zero point 0), the only kind TensorRT executes.

* `WeightQuantizer`: per-output-channel step `delta` found by an MSE search over clipping ratios, AdaRound learned
  rounding (Nagel et al. 2020) with the rectified sigmoid h(alpha) and the annealed rounding regulariser; `freeze()`
  turns it into stored integers `w_int` (int8) and `delta`.
* `ActQuantizer`: per-tensor LSQ step size (Esser et al. 2020) with gradient scale g = 1/sqrt(numel * Qp),
  initialised from data by an MSE search over clipping ratios (or a percentile); optional QDrop.
Both use the range [-2^(b-1), 2^(b-1)-1].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import PqcadError

ZETA, GAMMA = 1.1, -0.1  # AdaRound stretch of the sigmoid so h reaches exactly 0 and 1


def qrange(bits: int) -> tuple[int, int]:
    """Signed symmetric integer range [-2^(b-1), 2^(b-1)-1]."""
    if not 2 <= int(bits) <= 16:
        raise PqcadError(f"unsupported bit width {bits} (2..16)")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value x, gradient scaled by g (LSQ)."""
    return (x - x * g).detach() + x * g


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """AdaRound h(alpha) = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _fake_quant(x: torch.Tensor, delta: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / delta), qmin, qmax) * delta


def random_subsample(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k elements of flat x drawn uniformly (with replacement; indices from a seeded CPU generator, so a CPU and a
    GPU run pick the same ones). A strided pick x[::s] aliases with the NCHW layout: when s is a multiple of W it
    keeps a single image column (at the border, where activations are small), and the range found from it clips
    the rest of the image (the up-block convs of a 32x32 UNet lost 13-14 % of their input that way)."""
    if x.numel() <= k:
        return x
    idx = torch.randint(0, x.numel(), (k,), generator=torch.Generator().manual_seed(seed))
    return x[idx.to(x.device)]


def mse_channel_scale(w: torch.Tensor, bits: int, channel_axis: int = 0, grid: int = 100,
                      lo: float = 0.2) -> torch.Tensor:
    """Per-channel step minimising ||Q(w) - w||^2 over clipping ratios r*max|w_c| (r in [lo, 1])."""
    qmin, qmax = qrange(bits)
    wc = w.detach().transpose(0, channel_axis).reshape(w.shape[channel_axis], -1).float()
    amax = wc.abs().amax(1).clamp_min(1e-8)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / qmax
    for r in torch.linspace(lo, 1.0, grid).tolist():
        d = (amax * r / qmax).unsqueeze(1)
        err = (_fake_quant(wc, d, qmin, qmax) - wc).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, d.squeeze(1), best)
    return best


def mse_tensor_scale(x: torch.Tensor, bits: int, grid: int = 80, lo: float = 0.01,
                     method: str = "mse", percentile: float = 0.9999) -> torch.Tensor:
    """Per-tensor step from sample values: MSE search over clipping ratios, or a percentile of |x|."""
    qmin, qmax = qrange(bits)
    x = x.detach().float().flatten()
    amax = x.abs().max().clamp_min(1e-8)
    if method == "percentile":
        k = max(1, int(math.ceil(percentile * x.numel())))
        return (x.abs().kthvalue(k).values.clamp_min(1e-8) / qmax).reshape(())
    errs = []
    ratios = torch.linspace(lo, 1.0, grid, device=x.device)
    for r in ratios:
        d = amax * r / qmax
        errs.append((_fake_quant(x, d, qmin, qmax) - x).pow(2).mean())
    errs = torch.stack(errs)
    i = int(torch.argmin(errs))
    best = amax * ratios[i] / qmax
    return best.reshape(())


class _SymmetricQuantizer(nn.Module):
    """`bits` (validated) and the signed integer range [qmin, qmax] both quantizers clamp to."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)
        qrange(self.bits)

    @property
    def qmin(self) -> int:
        return qrange(self.bits)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits)[1]


class WeightQuantizer(_SymmetricQuantizer):
    """Per-output-channel symmetric weight quantizer with AdaRound learned rounding.

    Modes: "nearest" (round-to-nearest), "soft" (floor + h(alpha), differentiable), "hard" (floor + [alpha >= 0]).
    After `freeze()` the quantizer holds `w_int` (int8) and `delta` and ignores the weight passed to it.
    """

    def __init__(self, bits: int, channel_axis: int = 0):
        super().__init__(bits)
        self.channel_axis = channel_axis
        self.mode = "nearest"
        self.frozen = False
        self.register_buffer("delta", torch.empty(0))
        self.alpha: Optional[nn.Parameter] = None

    # -- shape helpers ------------------------------------------------------------------------------------
    def _bshape(self, w: torch.Tensor) -> list[int]:
        shape = [1] * w.dim()
        shape[self.channel_axis] = -1
        return shape

    # -- initialisation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def init(self, w: torch.Tensor, bits: Optional[int] = None) -> None:
        """(Re)initialise delta by MSE search on `w` and alpha so that h(alpha) equals the fractional part."""
        if self.frozen:
            raise PqcadError("cannot re-initialise a frozen weight quantizer")
        if bits is not None:
            qrange(int(bits))
            self.bits = int(bits)
        self.delta = mse_channel_scale(w, self.bits, self.channel_axis).to(w.device)
        d = self.delta.reshape(self._bshape(w))
        rest = (w / d - torch.floor(w / d)).clamp(1e-4, 1 - 1e-4)
        # inverse of the rectified sigmoid: sigmoid(alpha) = (rest - gamma) / (zeta - gamma)
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        self.alpha = nn.Parameter(alpha.float(), requires_grad=True)

    @property
    def initialized(self) -> bool:
        return self.delta.numel() > 0

    # -- forward --------------------------------------------------------------------------------------------
    def integers(self, w: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """Integer grid values (float dtype; fractional in soft mode) before scaling by delta."""
        mode = mode or self.mode
        d = self.delta.reshape(self._bshape(w))
        if mode == "nearest" or self.alpha is None:
            q = torch.round(w / d)
        elif mode == "soft":
            q = torch.floor(w / d) + rectified_sigmoid(self.alpha)
        elif mode == "hard":
            q = torch.floor(w / d) + (self.alpha >= 0).to(w.dtype)
        else:
            raise ValueError(mode)
        return torch.clamp(q, self.qmin, self.qmax)

    def forward(self, w: Optional[torch.Tensor]) -> torch.Tensor:
        if self.frozen:
            return self.w_int.to(self.delta.dtype) * self.delta.reshape(self._bshape(self.w_int))
        if not self.initialized:
            self.init(w)
        return self.integers(w) * self.delta.reshape(self._bshape(w))

    def round_loss(self, beta: float) -> torch.Tensor:
        """AdaRound regulariser sum(1 - |2h(alpha) - 1|^beta)."""
        h = rectified_sigmoid(self.alpha)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    # -- freezing -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self, w: torch.Tensor) -> None:
        """Store the hard-rounded integers (int8) and delta; drop alpha."""
        if self.frozen:
            return
        if self.bits > 8:
            raise PqcadError(f"cannot store {self.bits}-bit weights as int8")
        if not self.initialized:
            self.init(w)
        q = self.integers(w, "hard" if self.alpha is not None and self.mode != "nearest" else "nearest")
        self.prepare_frozen(tuple(w.shape), w.device)
        self.w_int.copy_(q.to(torch.int8))
        self.alpha = None
        self.frozen = True

    def prepare_frozen(self, shape: tuple[int, ...], device=None) -> None:
        """Register empty frozen buffers (used by loaders before load_state_dict)."""
        self.register_buffer("w_int", torch.zeros(shape, dtype=torch.int8, device=device))
        if self.delta.numel() != shape[self.channel_axis]:
            self.delta = torch.ones(shape[self.channel_axis], device=device)
        self.alpha = None
        self.frozen = True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.channel_axis}, mode={self.mode}, frozen={self.frozen}"


class ActQuantizer(_SymmetricQuantizer):
    """Per-tensor symmetric LSQ activation quantizer; identity while disabled.

    `calibrating=True` makes it record a subsample of its inputs (for `init_from_data`) and pass them unchanged.
    `drop_prob > 0` in training mode keeps each element in FP with that probability (QDrop).
    """

    def __init__(self, bits: int, enabled: bool = True):
        super().__init__(bits)
        self.enabled = bool(enabled)
        self.scale = nn.Parameter(torch.ones(()), requires_grad=True)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.calibrating = False
        self.drop_prob = 0.0
        self.drop_generator: Optional[torch.Generator] = None
        self._samples: list[torch.Tensor] = []
        self.max_samples = 1 << 18
        self._draws = 0  # seeds the calibration subsampling: call i of this quantizer draws with seed i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._draws += 1
            self._samples.append(random_subsample(x.detach().flatten(), self.max_samples // 4, self._draws).float())
            return x
        if not self.enabled:
            return x
        g = 1.0 / math.sqrt(x.numel() * self.qmax)
        s = grad_scale(self.scale, g).abs().clamp_min(1e-12)
        xq = round_ste(torch.clamp(x / s, self.qmin, self.qmax)) * s
        if self.training and self.drop_prob > 0:
            keep_fp = torch.rand(x.shape, device=x.device, generator=self.drop_generator) < self.drop_prob
            xq = torch.where(keep_fp, x, xq)
        return xq

    @torch.no_grad()
    def init_from_data(self, method: str = "mse") -> None:
        """Set the step size from the recorded samples (MSE search over clipping ratios, or percentile)."""
        if not self._samples:
            raise PqcadError("activation quantizer saw no calibration data")
        x = random_subsample(torch.cat(self._samples), self.max_samples, 0)
        self.scale.data = mse_tensor_scale(x, self.bits, method=method).to(self.scale.device)
        self.initialized.fill_(True)
        self._samples = []
        self.calibrating = False

    def step(self) -> float:
        return float(self.scale.detach().abs())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"
