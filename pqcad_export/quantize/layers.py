"""Quantized wrappers of Conv2d / Linear: fake-quant during optimisation, stored integers + scales after freeze.

Every consumer (ONNX exporter, CAD distillation) reads them through the same accessors:
`weight_int()`, `weight_scale()`, `act_scales()`, `weight_bits`, `act_bits`, `act_quant_enabled`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActQuantizer, WeightQuantizer


class _QuantBase(nn.Module):
    """Shared state: FP base weight `w_fp` (dropped at freeze), bias, `.wq` and `.aq`."""

    kind = "base"

    def __init__(self, fp: nn.Module, weight_bits: int, act_bits: int, act_quant: bool):
        super().__init__()
        self.register_buffer("w_fp", fp.weight.detach().clone())
        if fp.bias is not None:
            self.bias = nn.Parameter(fp.bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None
        self.wq = WeightQuantizer(weight_bits, channel_axis=0)
        self.aq = ActQuantizer(act_bits, enabled=act_quant)

    # -- accessors (docs/interfaces.md) ---------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The effective (fake-quantized) weight the layer computes with."""
        return self.wq(None if self.wq.frozen else self.w_fp)

    @property
    def weight_bits(self) -> int:
        return self.wq.bits

    @property
    def act_bits(self) -> int:
        return self.aq.bits

    @property
    def act_quant_enabled(self) -> bool:
        return self.aq.enabled

    def act_quantizers(self) -> list[ActQuantizer]:
        return [self.aq]

    def set_act_quant(self, enabled: bool) -> None:
        for q in self.act_quantizers():
            q.enabled = bool(enabled)

    @torch.no_grad()
    def weight_int(self) -> torch.Tensor:
        """int8 tensor of grid values in [-2^(b-1), 2^(b-1)-1], same shape as the FP weight."""
        if self.wq.frozen:
            return self.wq.w_int.clone()
        mode = "hard" if self.wq.alpha is not None and self.wq.mode != "nearest" else "nearest"
        return self.wq.integers(self.w_fp, mode).to(torch.int8)

    @torch.no_grad()
    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel step Tensor[C_out] (float32)."""
        if not self.wq.initialized:
            self.wq.init(self.w_fp)
        return self.wq.delta.detach().float().clone()

    def act_scales(self) -> list[float]:
        return [q.step() for q in self.act_quantizers()]

    def freeze(self) -> None:
        """Replace learned rounding by stored integers; drop the FP weight."""
        if self.wq.frozen:
            return
        self.wq.freeze(self.w_fp)
        del self.w_fp
        self.register_buffer("w_fp", None)

    def prepare_frozen(self, weight_shape: tuple[int, ...]) -> None:
        self.wq.prepare_frozen(weight_shape, self.bias.device if self.bias is not None else None)
        if "w_fp" in self._buffers:
            del self._buffers["w_fp"]
        self.register_buffer("w_fp", None)

    def spec(self) -> dict:
        """What a loader needs to rebuild this wrapper (JSON-able)."""
        return {"kind": self.kind, "weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "act_quant": self.act_quant_enabled, "weight_shape": list(self._weight_shape())}

    def _weight_shape(self) -> tuple[int, ...]:
        return tuple(self.wq.w_int.shape) if self.wq.frozen else tuple(self.w_fp.shape)


class QuantConv2d(_QuantBase):
    kind = "conv"

    def __init__(self, conv: nn.Conv2d, weight_bits: int, act_bits: int, act_quant: bool = True):
        super().__init__(conv, weight_bits, act_bits, act_quant)
        for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode"):
            setattr(self, k, getattr(conv, k))
        if self.padding_mode != "zeros":
            raise ValueError("only zero padding is supported")

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(self.aq(x), self.weight, self.bias)


class QuantLinear(_QuantBase):
    kind = "linear"

    def __init__(self, linear: nn.Linear, weight_bits: int, act_bits: int, act_quant: bool = True):
        super().__init__(linear, weight_bits, act_bits, act_quant)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.aq(x), self.weight, self.bias)


class SplitQuantConv2d(QuantConv2d):
    """Conv on torch.cat([hidden, skip]) with one activation scale per part (Q-Diffusion split quantization).

    Channels [0, split) use `.aq`, channels [split, C_in) use `.aq2`; conv(cat(q1(a), q2(b))) equals
    conv_a(q1(a)) + conv_b(q2(b)), which is how the exporter writes it.
    """

    kind = "split"

    def __init__(self, conv: nn.Conv2d, split: int, weight_bits: int, act_bits: int, act_quant: bool = True):
        super().__init__(conv, weight_bits, act_bits, act_quant)
        if not 0 < split < conv.in_channels:
            raise ValueError(f"split {split} outside (0, {conv.in_channels})")
        self.split = int(split)
        self.aq2 = ActQuantizer(act_bits, enabled=act_quant)

    def act_quantizers(self) -> list[ActQuantizer]:
        return [self.aq, self.aq2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not any(q.enabled or q.calibrating for q in (self.aq, self.aq2)):
            return self._conv(x, self.weight, self.bias)
        x = torch.cat([self.aq(x[:, : self.split]), self.aq2(x[:, self.split:])], dim=1)
        return self._conv(x, self.weight, self.bias)

    def spec(self) -> dict:
        d = super().spec()
        d["split"] = self.split
        return d


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear, SplitQuantConv2d)
