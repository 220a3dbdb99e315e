"""tools/efficiency_table.py: MAC counting, bit operations and packed weight bytes on a tiny UNet (no latency)."""

import copy
import importlib.util
import sys
from pathlib import Path

import torch

from conftest import make_tiny_unet

_tools = Path(__file__).parents[1] / "tools"
sys.path.insert(0, str(_tools))
_spec = importlib.util.spec_from_file_location("efficiency_table", _tools / "efficiency_table.py")
eff = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eff)


def test_macs_bops_and_bytes_follow_the_layer_arithmetic():
    unet = make_tiny_unet(attention=True)
    macs = eff.layer_macs(unet, (1, 16, 16))
    # conv_in: 1 -> 16 channels, 3x3, 16x16 output
    assert macs["conv_in"] == 16 * 16 * 16 * 1 * 9
    attn = [k for k in macs if k.endswith("attentions.0")]
    assert attn and all(v > 0 for k, v in macs.items() if k in attn)
    q = eff.quick_quantize(copy.deepcopy(unet), "w4a8")
    bw = eff.bit_widths(q)
    assert set(k for k in macs) <= set(bw)  # every counted layer has its bit widths
    fp, w4 = eff.gbops(macs, {}), eff.gbops(macs, bw)
    assert abs(fp - sum(macs.values()) * 1024 / 1e9) < 1e-9
    expect = sum(n * bw[k][0] * bw[k][1] for k, n in macs.items()) / 1e9
    assert abs(w4 - expect) < 1e-12 and w4 < fp / 16  # at most 8x8 per MAC instead of 32x32
    n_params = sum(p.numel() for p in unet.parameters())
    assert eff.weight_bytes(unet, {}) == 4 * n_params
    conv = unet.conv_in.weight
    only_in = {"conv_in": (4, 8)}
    saved = 4 * conv.numel() - ((conv.numel() * 4 + 7) // 8 + 4 * conv.shape[0])
    assert eff.weight_bytes(unet, only_in) == 4 * n_params - saved
