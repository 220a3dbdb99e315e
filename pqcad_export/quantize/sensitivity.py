"""Per-layer quantization sensitivity: what quantizing ONE layer alone does to the UNet output.

For every Conv2d / Linear of the FP UNet: (a) its input activations at A bits (static per-tensor MSE-clipped scale,
symmetric, zero point 0; skip-concat convs get one scale per half, as `SplitQuantConv2d`), (b) separately its
weights at K bits (round-to-nearest, per-channel MSE scale), each measured as the eps MSE against the FP model,
normalised by mean(eps_fp^2), over a fixed subset of calibration rows spanning the calibration time steps.

Why an estimate: measuring 2 x ~110 perturbed forward passes of the built-in teacher takes 10+ minutes on 2 shared
cores. The output error of a perturbation d of a layer input x is, to first order, ||J d||^2 (J = d eps / d x),
and E_r[(r^T J d)^2] = ||J d||^2 for r ~ N(0, I): so one backward pass per random probe r gives an unbiased
estimate of every layer's linearised error at once (cross terms included; per row for activations, over the
batch for the shared weights). The top `verify_top` activation layers are then measured exactly (a real forward
with only that layer quantized) and both numbers are written, so the estimate's quality is visible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..bits import BitSpec
from .blocks import call_unet
from .quantizers import _fake_quant, mse_channel_scale, mse_tensor_scale, qrange, random_subsample
from .wrap import FIRST_LAST, split_points


@dataclass
class SensitivityConfig:
    rows: int = 16         # calibration rows used (evenly spread over the sorted time steps)
    probes: int = 2        # random output probes (backward passes)
    verify_top: int = 8    # activation layers re-measured exactly (one forward each)
    seed: int = 0
    act_samples: int = 1 << 16  # input values per layer for the MSE scale search

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_targets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers `wrap_unet` quantizes (plain Conv2d / Linear), in module order."""
    return [(n, m) for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def default_precision(name: str, bits: BitSpec, first_last_bits: Optional[int], io_act_quant: bool
                      ) -> tuple[int, bool]:
    """(weight bits, activation quantized) that `wrap_unet` gives `name` without a plan."""
    wb = first_last_bits if (name in FIRST_LAST and first_last_bits) else bits.weight_bits
    return int(wb), bool(bits.quantize_activations and (io_act_quant or name not in FIRST_LAST))


def _rows(calib: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    t = calib["timestep"]
    order = torch.argsort(t.cpu(), stable=True)
    pick = order[torch.linspace(0, len(order) - 1, min(n, len(order))).round().long()]
    return {k: v[pick.to(v.device)] for k, v in calib.items()}


def _fq_act(x: torch.Tensor, scales: list[torch.Tensor], split: Optional[int], bits: int) -> torch.Tensor:
    lo, hi = qrange(bits)
    if split is None:
        return _fake_quant(x, scales[0], lo, hi)
    return torch.cat([_fake_quant(x[:, :split], scales[0], lo, hi),
                      _fake_quant(x[:, split:], scales[1], lo, hi)], 1)


def _fq_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = qrange(bits)
    d = mse_channel_scale(w, bits).to(w.device).reshape(-1, *[1] * (w.dim() - 1))
    return _fake_quant(w, d, lo, hi)


def measure_sensitivity(fp_unet: nn.Module, calib: dict[str, torch.Tensor], bits: BitSpec,
                        first_last_bits: Optional[int] = 8, io_act_quant: bool = False,
                        cfg: Optional[SensitivityConfig] = None) -> dict[str, Any]:
    """The sensitivity document (`sensitivity.json`): per-layer costs and single-layer output errors."""
    cfg = cfg or SensitivityConfig()
    unet = fp_unet
    rows = _rows(calib, cfg.rows)
    splits = split_points(unet)
    targets = layer_targets(unet)
    inputs: dict[str, torch.Tensor] = {}
    macs: dict[str, int] = {}

    def pre(name):
        def hook(mod, args):
            x = args[0]
            if not x.requires_grad:  # e.g. the time embedding: make it differentiable on its own
                x = x.detach().requires_grad_(True)
            inputs[name] = x
            return (x, *args[1:])
        return hook

    def post(name):
        def hook(mod, args, out):
            per_out = out[0].numel()
            k = mod.in_features if isinstance(mod, nn.Linear) else \
                (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            macs[name] = int(per_out * k)
        return hook

    hooks = [m.register_forward_pre_hook(pre(n)) for n, m in targets]
    hooks += [m.register_forward_hook(post(n)) for n, m in targets]
    was = {n: p.requires_grad for n, p in unet.named_parameters()}
    weights = {n: m.weight for n, m in targets}
    act_est = {n: 0.0 for n, _ in targets}
    w_est = {n: 0.0 for n, _ in targets}
    scales: dict[str, list[torch.Tensor]] = {}
    w_delta: dict[str, torch.Tensor] = {}
    prec = {n: default_precision(n, bits, first_last_bits, io_act_quant) for n, _ in targets}
    try:
        for p in weights.values():
            p.requires_grad_(True)
        gen = torch.Generator().manual_seed(cfg.seed)
        for probe in range(max(1, cfg.probes)):
            inputs.clear()
            with torch.enable_grad():
                eps = call_unet(unet, rows)
                if probe == 0:
                    eps_fp = eps.detach()
                r = torch.randn(eps.shape, generator=gen).to(eps.device)
                names = [n for n, _ in targets if n in inputs]
                grads = torch.autograd.grad((eps * r).sum(), [inputs[n] for n in names] +
                                            [weights[n] for n in names], allow_unused=True)
            g_in, g_w = grads[:len(names)], grads[len(names):]
            for i, n in enumerate(names):
                x = inputs[n].detach()
                if probe == 0:
                    sp = splits.get(n)
                    parts = [x] if sp is None else [x[:, :sp], x[:, sp:]]
                    scales[n] = [mse_tensor_scale(random_subsample(p.flatten(), cfg.act_samples, cfg.seed + j),
                                                  bits.act_bits) for j, p in enumerate(parts)]
                    w = weights[n].detach()
                    w_delta[n] = _fq_weight(w, prec[n][0]) - w
                if g_in[i] is not None and bits.quantize_activations:
                    d = _fq_act(x, scales[n], splits.get(n), bits.act_bits) - x
                    act_est[n] += float((g_in[i] * d).flatten(1).sum(1).pow(2).sum())
                if g_w[i] is not None:
                    w_est[n] += float((g_w[i] * w_delta[n]).sum().pow(2))
    finally:
        for h in hooks:
            h.remove()
        for n, p in unet.named_parameters():
            p.requires_grad_(was[n])
        inputs.clear()
    norm = float(eps_fp.pow(2).sum()) * max(1, cfg.probes)  # MSE / mean(eps^2) = SSE / sum(eps^2)
    total_macs = sum(macs.values()) or 1
    layers = []
    for n, m in targets:
        if n not in macs:
            continue
        wb, act_on = prec[n]
        numel = int(m.weight.numel())
        layers.append({
            "name": n, "kind": ("split" if n in splits else "conv") if isinstance(m, nn.Conv2d) else "linear",
            "macs": macs[n], "mac_share": macs[n] / total_macs, "weight_params": numel,
            "weight_bits": wb, "act_bits": bits.act_bits if act_on else None, "act_quant_default": act_on,
            "weight_bytes": (numel * wb + 7) // 8, "bops": macs[n] * wb * (bits.act_bits if act_on else 16),
            "act_sensitivity": act_est[n] / norm if bits.quantize_activations else None,
            "weight_sensitivity": w_est[n] / norm,
            "act_sensitivity_exact": None})
    _verify(unet, rows, eps_fp, layers, scales, splits, bits, cfg.verify_top)
    return {"format": "pqcad-sensitivity", "version": 1, "bits": bits.name, "rows": int(rows["sample"].shape[0]),
            "timesteps": sorted({int(t) for t in rows["timestep"].tolist()}), "config": cfg.to_dict(),
            "metric": "eps MSE vs FP / mean(eps_fp^2), one layer quantized alone (first-order probe estimate; "
                      "act_sensitivity_exact: a real forward pass)",
            "total_macs": total_macs, "layers": layers}


@torch.no_grad()
def _verify(unet, rows, eps_fp, layers, scales, splits, bits: BitSpec, k: int) -> None:
    """Exact single-layer activation errors for the top-k layers by estimate (a forward each)."""
    if not bits.quantize_activations or k <= 0:
        return
    cand = sorted((L for L in layers if L["act_quant_default"]), key=lambda L: -L["act_sensitivity"])[:k]
    denom = float(eps_fp.pow(2).mean())
    for L in cand:
        n = L["name"]
        mod = unet.get_submodule(n)
        h = mod.register_forward_pre_hook(
            lambda _m, a, _n=n: (_fq_act(a[0], scales[_n], splits.get(_n), bits.act_bits), *a[1:]))
        try:
            eps = call_unet(unet, rows)
        finally:
            h.remove()
        L["act_sensitivity_exact"] = float((eps - eps_fp).pow(2).mean()) / denom


def plot_sensitivity(doc: dict[str, Any], out_png: str | Path, top: int = 20) -> Optional[Path]:
    """Bar chart of the `top` layers by activation sensitivity, with their weight sensitivity beside."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers = doc["layers"]
    key = "act_sensitivity" if any(L["act_sensitivity"] for L in layers) else "weight_sensitivity"
    picked = sorted(layers, key=lambda L: -(L[key] or 0))[:top]
    names = [L["name"] for L in picked]
    a = [L["act_sensitivity"] or 0 for L in picked]
    w = [L["weight_sensitivity"] or 0 for L in picked]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(names) + 1.5))
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], a, 0.4, label=f"activations at {doc['bits']} (A bits)")
    ax.barh([i + 0.2 for i in y], w, 0.4, label="weights at their K bits")
    for i, L in enumerate(picked):
        ax.text(max(a[i], w[i]) * 1.02, i, f"{100 * L['mac_share']:.1f}% MACs", va="center", fontsize=7)
    ax.set_yticks(list(y))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=max(1e-6, min([v for v in a + w if v > 0] or [1e-6])))
    ax.set_xlabel("eps MSE vs FP / mean(eps^2), this layer quantized alone")
    ax.set_title(f"Layer sensitivity ({doc['bits']}, {doc['rows']} calibration rows)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


@torch.no_grad()
def mac_table(unet: nn.Module, example: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-image MACs and weight counts of every quantized (or plain) Conv2d / Linear: one forward at batch 1."""
    from .layers import QUANT_LAYER_TYPES

    macs: dict[str, int] = {}
    params: dict[str, int] = {}

    def post(name):
        def hook(mod, args, out):
            if isinstance(mod, nn.Linear) or hasattr(mod, "in_features"):
                k = mod.in_features
            else:
                k = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            macs[name] = int(out[0].numel() * k)
        return hook

    mods = [(n, m) for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)
            or isinstance(m, QUANT_LAYER_TYPES)]
    hooks = [m.register_forward_hook(post(n)) for n, m in mods]
    try:
        call_unet(unet, {k: v[:1] for k, v in example.items()})
    finally:
        for h in hooks:
            h.remove()
    for n, m in mods:
        w = m.wq.w_int if getattr(getattr(m, "wq", None), "frozen", False) else \
            (m.w_fp if hasattr(m, "w_fp") else m.weight)
        params[n] = int(w.numel())
    return {"layers": [{"name": n, "macs": macs[n], "weight_params": params[n]} for n, _ in mods if n in macs]}
