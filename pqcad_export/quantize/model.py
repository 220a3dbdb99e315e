"""`QuantizedModel`: a wrapped diffusers UNet plus what consumers need to know about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..bits import BitSpec
from ..model_io import UNetShapeMixin
from .wrap import attn_processors, quant_layers


@dataclass
class QuantizedModel(UNetShapeMixin):
    unet: nn.Module                      # diffusers UNet whose Conv2d/Linear are Quant* wrappers (frozen)
    bits: BitSpec
    method: str                          # "direct" | "pq" | "bitshrink" | "rtn"
    meta: dict[str, Any] = field(default_factory=dict)   # steps, scheduler_config, unet_config, fingerprint...
    log: dict[str, Any] = field(default_factory=dict)    # per-unit reconstruction log
    sensitivity: Optional[dict[str, Any]] = None          # sensitivity.py document (mixed precision auto)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.meta["scheduler_config"]

    @property
    def steps(self) -> int:
        return int(self.meta.get("steps", 100))

    @property
    def class_name(self) -> str:
        return self.meta.get("class_name", type(self.unet).__name__)

    def quant_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, QuantConv2d | QuantLinear | SplitQuantConv2d)."""
        return quant_layers(self.unet)

    def attn_processors(self):
        return attn_processors(self.unet)

    def to(self, device: str | torch.device) -> "QuantizedModel":
        self.unet.to(device)
        return self

    def __call__(self, sample, timestep, encoder_hidden_states=None) -> torch.Tensor:
        """eps, as a `pqcad_export.sampling.UNetFn`."""
        from .blocks import call_unet

        return call_unet(self.unet, {"sample": sample, "timestep": timestep,
                                     "encoder_hidden_states": encoder_hidden_states})
