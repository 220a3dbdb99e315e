"""Reconstruction units (BRECQ-style blocks) of a diffusers UNet, in execution order.

A unit is: conv_in, the time embedding, each ResnetBlock2D, each attention / Transformer2DModel block, each
Downsample2D / Upsample2D, the output head (conv_norm_out + act + conv_out), and, as a fallback, any quantized
layer no block covers. Its inputs are what the entry module receives; its output is what the exit module returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .attention import QuantAttnProcessor
from .layers import QUANT_LAYER_TYPES

UNIT_CLASSES = ("ResnetBlock2D", "Attention", "Transformer2DModel", "Downsample2D", "Upsample2D",
                "TimestepEmbedding")


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot find the output tensor in {type(out).__name__}")


@dataclass
class Unit:
    name: str
    entry: str                       # module whose call inputs are the unit inputs
    exit: str                        # module whose output is the unit output
    members: list[str] = field(default_factory=list)  # modules run, in order (len > 1 only for the head)

    def run(self, model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        if len(self.members) == 1:
            return first_tensor(model.get_submodule(self.members[0])(*args, **kwargs))
        x = model.get_submodule(self.members[0])(*args, **kwargs)
        for m in self.members[1:]:
            x = model.get_submodule(m)(x)
        return first_tensor(x)

    def modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(m) for m in self.members]

    def quant_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        out = []
        for m in self.members:
            for n, sub in model.get_submodule(m).named_modules():
                if isinstance(sub, QUANT_LAYER_TYPES):
                    out.append((f"{m}.{n}" if n else m, sub))
        return out

    def attn_processors(self, model: nn.Module) -> list[QuantAttnProcessor]:
        return [sub for m in self.members for sub in model.get_submodule(m).modules()
                if isinstance(sub, QuantAttnProcessor)]


def find_units(unet: nn.Module, example_inputs: dict[str, torch.Tensor]) -> list[Unit]:
    """All units of a (wrapped or FP) UNet, ordered by first execution on `example_inputs`."""
    units: list[Unit] = []
    taken: list[str] = []

    def covered(name: str) -> bool:
        return any(name == t or name.startswith(t + ".") for t in taken)

    names = dict(unet.named_modules())
    if "conv_in" in names:
        units.append(Unit("conv_in", "conv_in", "conv_in", ["conv_in"]))
        taken.append("conv_in")
    head = [n for n in ("conv_norm_out", "conv_act", "conv_out") if names.get(n) is not None]
    if "conv_out" in head:
        units.append(Unit("head", head[0], "conv_out", head))
        taken.extend(head)
    for name, mod in names.items():
        if not name or covered(name):
            continue
        if type(mod).__name__ in UNIT_CLASSES:
            units.append(Unit(name, name, name, [name]))
            taken.append(name)
    for name, mod in names.items():  # fallback: uncovered quantized layers
        if isinstance(mod, QUANT_LAYER_TYPES + (nn.Conv2d, nn.Linear)) and not covered(name):
            units.append(Unit(name, name, name, [name]))
            taken.append(name)

    order: dict[str, int] = {}
    hooks = []
    for u in units:
        def pre(_m, _a, _u=u):
            order.setdefault(_u.name, len(order))
        hooks.append(names[u.entry].register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            call_unet(unet, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return sorted((u for u in units if u.name in order), key=lambda u: order[u.name])


def call_unet(unet: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """eps for a calibration batch {"sample", "timestep", optional "encoder_hidden_states"}."""
    kw = {}
    if batch.get("encoder_hidden_states") is not None:
        kw["encoder_hidden_states"] = batch["encoder_hidden_states"]
    return first_tensor(unet(batch["sample"], batch["timestep"], **kw))
