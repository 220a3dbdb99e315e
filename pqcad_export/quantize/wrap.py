"""Replace Conv2d / Linear of a diffusers UNet by quantized wrappers (in place), and rebuild that structure
from a saved spec. conv_in / conv_out keep 8-bit weights unless `first_last_bits=None`, and FP inputs unless
`io_act_quant=True`: x_t entering conv_in and the features entering conv_out (whose output is the noise
prediction itself) carry the error straight into every sampling step. Q-Diffusion leaves the network output
unquantized and NVIDIA ModelOpt's diffusers recipe keeps both layers out of INT8; on the built-in teacher
quantizing these two inputs at 8 bits made the W8A8 sample error 2.2x larger (docs/RESULTS.md)."""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from ..bits import BitSpec
from .attention import QuantAttnProcessor
from .layers import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear, SplitQuantConv2d

FIRST_LAST = ("conv_in", "conv_out")


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def split_points(unet: nn.Module) -> dict[str, int]:
    """Shortcut convs fed by torch.cat([hidden, skip]) in up blocks -> number of `hidden` channels.

    Mirrors diffusers' UNet2D*Model.__init__: up block j gets prev_output_channel = reversed(block_out)[j-1]
    (j>0; reversed[0] for j=0); resnet i of that block sees cat of (prev_output_channel if i == 0 else
    out_channels) hidden channels and the skip.
    """
    out: dict[str, int] = {}
    boc = list(getattr(unet.config, "block_out_channels", []) or [])
    if not boc or not hasattr(unet, "up_blocks"):
        return out
    rev = list(reversed(boc))
    for j, block in enumerate(unet.up_blocks):
        prev_out = rev[j - 1] if j > 0 else rev[0]
        for i, res in enumerate(getattr(block, "resnets", []) or []):
            sc = getattr(res, "conv_shortcut", None)
            if not isinstance(sc, nn.Conv2d):
                continue
            split = prev_out if i == 0 else res.out_channels
            if 0 < split < sc.in_channels:
                out[f"up_blocks.{j}.resnets.{i}.conv_shortcut"] = int(split)
    return out


def wrap_unet(unet: nn.Module, bits: BitSpec, first_last_bits: Optional[int] = 8,
              attn_matmul_quant: bool = False, io_act_quant: bool = False,
              fp_act: Iterable[str] = (), w8: Iterable[str] = ()) -> dict[str, dict]:
    """Quantize-wrap every Conv2d / Linear in place; returns {module name: spec} (see layers.spec()).
    A mixed-precision plan (plan.py) names layers whose inputs stay FP (`fp_act`) or whose weights stay 8-bit (`w8`)."""
    splits = split_points(unet)
    fp_act, w8 = set(fp_act), set(w8)
    targets = [(n, m) for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for name, mod in targets:
        wb = first_last_bits if (name in FIRST_LAST and first_last_bits) else bits.weight_bits
        wb = 8 if name in w8 else wb
        act_on = bits.quantize_activations and (io_act_quant or name not in FIRST_LAST) and name not in fp_act
        if isinstance(mod, nn.Conv2d):
            new = SplitQuantConv2d(mod, splits[name], wb, bits.act_bits, act_on) if name in splits \
                else QuantConv2d(mod, wb, bits.act_bits, act_on)
        else:
            new = QuantLinear(mod, wb, bits.act_bits, act_on)
        _set_module(unet, name, new)
    if attn_matmul_quant and bits.quantize_activations:
        for name, mod in list(unet.named_modules()):
            if hasattr(mod, "set_processor") and hasattr(mod, "processor") and \
                    not isinstance(mod.processor, QuantAttnProcessor):
                mod.set_processor(QuantAttnProcessor(mod.processor, bits.act_bits, True))
    return layer_specs(unet)


def layer_specs(unet: nn.Module) -> dict[str, dict]:
    specs = {name: m.spec() for name, m in quant_layers(unet)}
    specs.update({name: m.spec() for name, m in attn_processors(unet)})
    return specs


def quant_layers(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, QuantConv2d | QuantLinear | SplitQuantConv2d) in module order."""
    for name, m in unet.named_modules():
        if isinstance(m, QUANT_LAYER_TYPES):
            yield name, m


def attn_processors(unet: nn.Module) -> Iterator[tuple[str, QuantAttnProcessor]]:
    for name, m in unet.named_modules():
        if isinstance(m, QuantAttnProcessor):
            yield name, m


def set_act_quant(unet: nn.Module, enabled: bool) -> None:
    for _, m in list(quant_layers(unet)) + list(attn_processors(unet)):
        m.set_act_quant(enabled)


def rebuild_from_specs(unet: nn.Module, specs: dict[str, dict]) -> None:
    """Recreate frozen wrappers on a freshly built FP UNet so a saved state dict loads strictly."""
    for name, sp in specs.items():
        if sp["kind"] == "attn":
            continue
        mod = unet.get_submodule(name)
        if sp["kind"] == "split":
            new = SplitQuantConv2d(mod, sp["split"], sp["weight_bits"], sp["act_bits"], sp["act_quant"])
        elif sp["kind"] == "conv":
            new = QuantConv2d(mod, sp["weight_bits"], sp["act_bits"], sp["act_quant"])
        elif sp["kind"] == "linear":
            new = QuantLinear(mod, sp["weight_bits"], sp["act_bits"], sp["act_quant"])
        else:
            raise ValueError(f"unknown layer kind {sp['kind']!r}")
        new.prepare_frozen(tuple(sp["weight_shape"]))
        _set_module(unet, name, new)
    for name, sp in specs.items():
        if sp["kind"] == "attn":
            attn = unet.get_submodule(name.rpartition(".")[0])
            attn.set_processor(QuantAttnProcessor(attn.processor, sp["act_bits"], sp["act_quant"]))


@torch.no_grad()
def freeze_all(unet: nn.Module) -> None:
    for _, m in quant_layers(unet):
        m.freeze()
