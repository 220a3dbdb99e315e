"""Quantizers, quantized layers, wrapping, attention processor (no reconstruction; fast)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_cond_unet, make_tiny_unet

from pqcad_export.bits import parse_bits
from pqcad_export.errors import PqcadError
from pqcad_export.quantize.attention import QuantAttnProcessor
from pqcad_export.quantize.blocks import call_unet, find_units
from pqcad_export.quantize.layers import QuantConv2d, QuantLinear, SplitQuantConv2d
from pqcad_export.quantize.quantizers import (ActQuantizer, WeightQuantizer, mse_channel_scale, qrange,
                                              rectified_sigmoid)
from pqcad_export.quantize.wrap import freeze_all, quant_layers, set_act_quant, split_points, wrap_unet


def _batch(n=2, c=1, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(n, c, s, s, generator=g), "timestep": torch.tensor([10, 900][:n])}


def _calibrate_acts(unet, batch):
    qs = [q for _, m in quant_layers(unet) for q in m.act_quantizers() if q.enabled]
    for q in qs:
        q.calibrating = True
    with torch.no_grad():
        call_unet(unet, batch)
    for q in qs:
        q.init_from_data()


def test_qrange_and_bad_bits():
    assert qrange(4) == (-8, 7) and qrange(8) == (-128, 127)
    with pytest.raises(PqcadError):
        WeightQuantizer(1)
    with pytest.raises(PqcadError):
        ActQuantizer(17)


def test_mse_scale_beats_max_scale_at_4_bits():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    w[0, 0, 0, 0] = 8.0  # an outlier: clipping should win
    d = mse_channel_scale(w, 4)
    dmax = w.abs().reshape(8, -1).amax(1) / 7

    def err(delta):
        return ((w / delta.view(-1, 1, 1, 1)).round().clamp(-8, 7) * delta.view(-1, 1, 1, 1) - w).pow(2).sum()

    assert err(d) <= err(dmax) and d[0] < dmax[0]


def test_adaround_soft_init_reproduces_weights_and_hard_is_on_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 5) * 0.1
    q = WeightQuantizer(4)
    q.init(w)
    q.mode = "soft"
    d = q.delta.view(-1, 1)
    inside = (w / d).abs() < 7  # weights the clipping does not touch
    assert torch.allclose(q(w)[inside], w[inside], atol=1e-3 * float(d.max()))
    h = rectified_sigmoid(q.alpha)
    assert float(q.round_loss(2.0).detach()) == pytest.approx(float((1 - (2 * h.detach() - 1).abs() ** 2).sum()), rel=1e-6)
    q.mode = "hard"
    hard = q(w) / d
    assert torch.equal(hard, hard.round()) and hard.min() >= -8 and hard.max() <= 7
    q.freeze(w)
    assert q.w_int.dtype == torch.int8 and torch.equal(q(None), hard * d)


def test_lsq_forward_range_and_gradient_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, generator=g) ** 3  # heavy tails: the MSE step clips some values
    r = torch.rand(101, generator=g) + 0.5
    q = ActQuantizer(8)
    q.calibrating = True
    q(x)
    q.init_from_data()
    y = q(x)
    s = q.scale.detach()
    assert torch.allclose(y / s, (y / s).round(), atol=1e-4)
    assert (y / s).min() >= -128 and (y / s).max() <= 127
    # LSQ: the step gradient is multiplied by g = 1/sqrt(numel * Qp)
    q.scale.grad = None
    q.scale.data.fill_(0.1)  # clips the tails
    (q(x) * r).sum().backward()
    g_lsq = q.scale.grad.clone()
    xs = x / 0.1
    dq = torch.where(xs < -128, torch.tensor(-128.0), torch.where(xs > 127, torch.tensor(127.0),
                     xs.round() - xs))
    assert (xs.abs() > 127).any() and float(g_lsq) == pytest.approx(float((dq * r).sum()) / (101 * 127) ** 0.5, rel=1e-4)
    q.enabled = False
    assert torch.equal(q(x), x)


def test_act_calibration_subsample_sees_the_whole_image():
    """The recorded subsample must not alias with the NCHW layout: here a stride pick (numel / budget = 16 = W)
    would keep only column 0, whose activations are 10x smaller than the rest of the image."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 16, 16, 16, generator=g)
    x[..., 0] *= 0.1
    q = ActQuantizer(8)
    q.max_samples = 16384  # budget per call: 4096 of 65536 elements
    q.calibrating = True
    q(x)
    q.init_from_data()
    full = ActQuantizer(8)
    full.max_samples = 1 << 20
    full.calibrating = True
    full(x)
    full.init_from_data()
    assert 0.7 < q.step() / full.step() < 1.3
    # deterministic: the same data gives the same step
    q2 = ActQuantizer(8)
    q2.max_samples, q2.calibrating = 16384, True
    q2(x)
    q2.init_from_data()
    assert q2.step() == q.step()


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_wrap_grid_levels_and_first_last_bits(bits):
    spec = parse_bits(bits)
    unet = make_tiny_unet(attention=True)
    wrap_unet(unet, spec)
    layers = dict(quant_layers(unet))
    n_fp = sum(1 for m in unet.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear))
    assert n_fp == 0 and len(layers) > 10
    assert layers["conv_in"].weight_bits == 8 and layers["conv_out"].weight_bits == 8
    _calibrate_acts(unet, _batch())
    freeze_all(unet)
    for name, m in layers.items():
        k = m.weight_bits
        assert k == (8 if name in ("conv_in", "conv_out") else spec.weight_bits)
        wi = m.weight_int()
        assert wi.dtype == torch.int8
        lo, hi = qrange(k)
        assert int(wi.min()) >= lo and int(wi.max()) <= hi
        per_ch = wi.reshape(wi.shape[0], -1)
        assert max(len(torch.unique(r)) for r in per_ch) <= 2 ** k
        s = m.weight_scale()
        assert s.shape == (wi.shape[0],) and (s > 0).all()
        shape = [-1] + [1] * (wi.dim() - 1)
        assert torch.equal(m.weight, wi.float() * s.view(shape))
        # conv_in / conv_out inputs stay FP unless io_act_quant (wrap.py says why)
        assert m.act_quant_enabled == (name not in ("conv_in", "conv_out")) and m.act_bits == 8
        if m.act_quant_enabled:
            assert all(v > 0 for v in m.act_scales())


def test_io_act_quant_quantizes_the_first_and_last_inputs():
    unet = make_tiny_unet()
    wrap_unet(unet, parse_bits("w8a8"), io_act_quant=True)
    assert all(m.act_quant_enabled for _, m in quant_layers(unet))


def test_weight_only_disables_activation_quantizers():
    unet = make_tiny_unet()
    wrap_unet(unet, parse_bits("w4a16"))
    for _, m in quant_layers(unet):
        assert not m.act_quant_enabled and m.weight_bits in (4, 8)


def test_split_points_match_the_concatenation():
    unet = make_tiny_unet(attention=True)
    seen = {}

    def hook(block_idx):
        def pre(_m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            skips = args[1] if len(args) > 1 else kwargs["res_hidden_states_tuple"]
            seen[block_idx] = (hidden.shape[1], [s.shape[1] for s in skips])
        return pre

    for j, b in enumerate(unet.up_blocks):
        b.register_forward_pre_hook(hook(j), with_kwargs=True)
    with torch.no_grad():
        call_unet(unet, _batch())
    splits = split_points(unet)
    assert splits
    for j, b in enumerate(unet.up_blocks):
        hidden, skips = seen[j]
        for i, res in enumerate(b.resnets):
            name = f"up_blocks.{j}.resnets.{i}.conv_shortcut"
            expect = hidden if i == 0 else res.out_channels
            assert splits[name] == expect
            assert expect + skips[-1 - i] == res.conv_shortcut.in_channels


def test_split_conv_equals_fp_conv_and_two_conv_form():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 6, 1)
    x = torch.randn(2, 12, 5, 5)
    sq = SplitQuantConv2d(conv, 4, 4, 8, act_quant=False)
    # quantizers disabled: exactly the conv with the (fake-quant) weight; FP conv when the weight is FP
    assert torch.equal(sq(x), F.conv2d(x, sq.weight, sq.bias))
    sq16 = SplitQuantConv2d(conv, 4, 16, 8, act_quant=False)
    assert torch.allclose(sq16(x), conv(x), atol=1e-4)
    # enabled: conv(cat(q1(a), q2(b))) == conv_a(q1(a)) + conv_b(q2(b)) (exporter's form)
    sq.set_act_quant(True)
    for q in sq.act_quantizers():
        q.calibrating = True
    sq(x)
    for q in sq.act_quantizers():
        q.init_from_data()
    assert sq.act_scales()[0] != sq.act_scales()[1]
    w = sq.weight
    two = F.conv2d(sq.aq(x[:, :4]), w[:, :4], sq.bias) + F.conv2d(sq.aq2(x[:, 4:]), w[:, 4:])
    assert torch.allclose(sq(x), two, atol=1e-5)
    with pytest.raises(ValueError):
        SplitQuantConv2d(conv, 12, 4, 8)


def test_wrapped_disabled_model_equals_fp_with_fp_weights():
    fp = make_tiny_unet(attention=True)
    q = copy.deepcopy(fp)
    wrap_unet(q, parse_bits("w8a8"), first_last_bits=None, attn_matmul_quant=True)
    set_act_quant(q, False)
    for _, m in quant_layers(q):
        m.wq.bits = 16  # effectively FP weights
    b = _batch()
    with torch.no_grad():
        assert torch.allclose(call_unet(q, b), call_unet(fp, b), atol=1e-4)


def test_attention_processor_exact_when_disabled_and_quantizes_when_enabled():
    fp = make_tiny_unet(attention=True)
    m = copy.deepcopy(fp)
    attn_fp = fp.down_blocks[1].attentions[0]
    attn = m.down_blocks[1].attentions[0]
    proc = QuantAttnProcessor(attn.processor, 8, enabled=False)
    attn.set_processor(proc)
    assert "processor.aq_q.scale" in dict(attn.named_parameters()) or \
        "processor.aq_q.scale" in attn.state_dict()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert torch.equal(attn(x), attn_fp(x))
        for q in proc.act_quantizers():
            q.calibrating = True
        attn(x)
        for q in proc.act_quantizers():
            q.init_from_data()
        proc.set_act_quant(True)
        y = attn(x)
    with torch.no_grad():
        ref = attn_fp(x)
    assert not torch.equal(y, ref) and torch.allclose(y, ref, atol=0.1 * float(ref.abs().max()))
    assert len(proc.act_scales()) == 4 and proc.act_quant_enabled


def test_units_cover_every_quantized_layer_in_execution_order():
    for unet, batch in ((make_tiny_unet(attention=True), _batch()),
                        (make_tiny_cond_unet(), {**_batch(c=2, s=8), "encoder_hidden_states": torch.randn(2, 3, 16)})):
        wrap_unet(unet, parse_bits("w4a8"))
        units = find_units(unet, batch)
        names = [u.name for u in units]
        assert names.index("conv_in") < names.index("head") and names[-1] == "head"
        assert "time_embedding" in names
        covered = {n for u in units for n, _ in u.quant_layers(unet)}
        assert covered == {n for n, _ in quant_layers(unet)}
        assert len(covered) == sum(len(u.quant_layers(unet)) for u in units)  # no layer in two units


def test_cond_unet_wraps_and_runs():
    unet = make_tiny_cond_unet()
    wrap_unet(unet, parse_bits("w4a8"), attn_matmul_quant=True)
    b = {**_batch(c=2, s=8), "encoder_hidden_states": torch.randn(2, 3, 16)}
    _calibrate_acts(unet, b)
    for _, p in [(n, m) for n, m in unet.named_modules() if isinstance(m, QuantAttnProcessor)]:
        for q in p.act_quantizers():
            q.calibrating = True
    with torch.no_grad():
        call_unet(unet, b)
    for p in [m for m in unet.modules() if isinstance(m, QuantAttnProcessor)]:
        for q in p.act_quantizers():
            q.init_from_data()
    freeze_all(unet)
    with torch.no_grad():
        out = call_unet(unet, b)
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
    assert any(isinstance(m, QuantLinear) for m in unet.modules())
    assert any(isinstance(m, QuantConv2d) for m in unet.modules())
