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


def test_relaxed_sampler_latency_mixes_the_two_engines_per_call_medians():
    from pqcad_export.model_io import load_model

    sched = load_model(None).scheduler_config
    rows = [{"precision": "W4A8", "status": "executed", "latency": {"1": {"unet_ms_per_call": 10.0},
                                                                    "32": {"unet_ms_per_call": 64.0}}},
            {"precision": "W4A8, fp32 activations (relaxed engine)", "status": "executed",
             "latency": {"1": {"unet_ms_per_call": 30.0}, "32": {"unet_ms_per_call": 128.0}}}]
    out = {r["fraction"]: r for r in eff._relax_latency(rows, [0.05, 0.2], sched)}
    # 5 % of 50 steps rounds to 2 relaxed steps, 20 % to 10 (engines.relax.relaxed_timesteps)
    assert out[0.05]["relaxed_steps"] == 2 and out[0.2]["relaxed_steps"] == 10
    assert out[0.05]["ms_per_image_by_batch"]["1"] == 2 * 30.0 + 48 * 10.0
    assert out[0.2]["ms_per_image_by_batch"]["32"] == (10 * 128.0 + 40 * 64.0) / 32
    assert abs(out[0.2]["average_act_bits"] - (40 * 8 + 10 * 32) / 50) < 1e-12
    assert "| 0.2 | 10 | 12.80 |" in eff.markdown({"rows": [], "relax": list(out.values())})
