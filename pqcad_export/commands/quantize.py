"""`pqcad-export quantize`: block-reconstruction quantization (PQ by default) of a diffusers UNet."""

from __future__ import annotations

import click

from ..cli import MODEL_HELP, PRESETS, friendly, main


@main.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--calib", required=True, type=click.Path(), help="calibration directory (C_QC from `calibrate`)")
@click.option("--bits", required=True, help="wKaA: w8a8, w4a8, w4a16, w8a16")
@click.option("--out", required=True, type=click.Path(), help="output directory for the quantized model")
@click.option("--method", default="pq", show_default=True, type=click.Choice(["pq", "direct", "bitshrink", "rtn"]),
              help="pq: progressive tau=2k -> k bits; direct: AdaRound at k bits; bitshrink: fixed-cycle baseline; "
                   "rtn: round-to-nearest + MSE scales, nothing learned")
@click.option("--mixed-precision", default="auto", show_default=True, type=click.Choice(["auto", "off"]),
              help="auto: keep the most sensitive layers' inputs FP (FP16 in TensorRT) and, below 8-bit weights, "
                   "their weights at 8 bits, within --fp-budget / --w8-budget; off: every layer integer")
@click.option("--fp-budget", default=None, type=float,
              help="max fraction of conv/linear MACs with FP inputs (auto) [default 0.08]")
@click.option("--w8-budget", default=None, type=float,
              help="max fraction of conv/linear weights kept at 8 bits when K < 8 (auto) [default 0.25]")
@click.option("--preset", default="quick", show_default=True, type=PRESETS)
@click.option("--iters", default=None, type=int, help="override AdaRound iterations per block")
@click.option("--attn-matmul-quant", is_flag=True, help="also quantize attention q, k, v and softmax output")
@click.option("--io-act-quant", is_flag=True,
              help="also quantize the inputs of conv_in (x_t) and conv_out (default: FP, like Q-Diffusion's "
                   "network output and ModelOpt's diffusers recipe; 8-bit there made the W8A8 sample error 2.2x larger)")
@click.option("--recon-loss", default="block", show_default=True, type=click.Choice(["block", "fbr"]),
              help="block: BRECQ block-output loss; fbr: + gamma * layer-wise losses (EDA-DM FBR)")
@click.option("--fbr-gamma", default=None, type=float, help="FBR layer-loss weight [default 0.8, EDA-DM CIFAR-10]")
@click.option("--qdrop", default=None, type=float, help="QDrop: keep each activation FP with probability P in LSQ")
@click.option("--compare-direct", is_flag=True,
              help="also run direct AdaRound at equal iterations and log Delta_Pert (geo-mean improvement)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="no progress bars")
@friendly
def quantize(model, calib, bits, out, method, preset, iters, attn_matmul_quant, io_act_quant, recon_loss, fbr_gamma,
             qdrop, compare_direct, device, seed, quiet, mixed_precision="auto", fp_budget=None, w8_budget=None):
    """Quantize weights (learned rounding, per-channel) and activations (learned steps) block by block."""
    from pathlib import Path

    from ..bits import parse_bits
    from ..errors import UsageError

    from .. import checks

    spec = parse_bits(bits)  # bad --bits: one line, exit 2, nothing written
    if iters is not None and iters < 1:
        raise UsageError("--iters must be >= 1")
    checks.in_range("--qdrop", qdrop, 0.0, 1.0)
    checks.writable_dir(out)
    checks.device(device)
    from ..quantize.plan import plan_overrides

    plan_over = plan_overrides(mixed_precision, fp_budget, w8_budget)  # bad budget: exit 2, nothing written
    from ..model_io import check_finite, load_model
    from ..quantize import ReconConfig
    from ..quantize.stage import CHECKPOINTS, run_quantize

    loaded = load_model(model, device)
    check_finite(loaded)  # NaN/inf model: refused before the first block, naming the parameter at fault
    overrides = {"seed": seed, "progress": not quiet, "attn_matmul_quant": attn_matmul_quant,
                 "io_act_quant": io_act_quant}
    if iters is not None:
        overrides["iters"] = iters
    overrides["recon_loss"] = recon_loss
    overrides.update(plan_over)
    if fbr_gamma is not None:
        overrides["fbr_gamma"] = fbr_gamma
    if qdrop is not None:
        overrides["qdrop_prob"] = qdrop
    cfg = ReconConfig.preset(preset, **overrides)
    out = Path(out)
    ckpt = out / CHECKPOINTS
    qm = run_quantize(loaded, calib, spec, method, cfg, out, device, seed=seed, compare_direct=compare_direct,
                      curve="quant_curve.png", keep_checkpoints=False)
    if "delta_pert_vs_direct" in qm.log:
        click.echo(f"Delta_Pert vs direct at equal iterations: {qm.log['delta_pert_vs_direct']:+.2%}")
    if qm.log.get("reused_units"):
        click.echo(f"reused {qm.log['reused_units']} of {len(qm.log['units'])} quantized blocks from {ckpt}")
    mp = qm.meta.get("mixed_precision", {})
    if mp.get("mode") == "auto":
        click.echo(f"mixed precision: {len(mp['fp_act_layers'])} layer(s) with FP inputs "
                   f"({100 * mp['fp_mac_fraction']:.1f} % of MACs), {len(mp['w8_layers'])} with 8-bit weights "
                   f"({100 * mp['w8_weight_fraction']:.1f} % of weights); see sensitivity.png")
    g = qm.log.get("geomean_pert")
    click.echo(f"quantized {spec.name} ({method}, {len(qm.log['units'])} blocks, "
               f"geo-mean block perturbation {g:.3e}) -> {out}" if g is not None else f"quantized -> {out}")

