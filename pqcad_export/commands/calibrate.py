"""`pqcad-export calibrate`: collect C_QC (and optionally C_DC) from the FP model's DDIM trajectories."""

from __future__ import annotations

import click

from ..cli import MODEL_HELP, PRESETS, cond_option, friendly, main

STRATEGY_NAMES = ("uniform", "ndtc", "tdac", "pcr")


@main.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(), help="output directory (gets c_qc/ and c_dc/ sets)")
@click.option("--steps", default=100, show_default=True, type=int, help="DDIM steps of the FP trajectories (T)")
@click.option("--strategy", default="uniform", show_default=True, type=click.Choice(STRATEGY_NAMES),
              help="how many inputs to keep per step and which (uniform: Q-Diffusion; ndtc: PTQ4DM; tdac: EDA-DM; "
                   "pcr: PCR progressive calibration along the quantized model's trajectory, needs --bits)")
@click.option("--bits", default=None, help="pcr: wKaA of the model quantized between stages (e.g. w4a8)")
@click.option("--pcr-stages", type=int, default=None, help="pcr: stages from x_T to x_0 [quick 2, paper 4]")
@click.option("--preset", default="quick", show_default=True, type=PRESETS)
@click.option("--n-per-step", type=int, default=None, help="samples kept per kept step [preset: quick 16, paper 256]")
@click.option("--every-k", type=int, default=None, help="keep every k-th step (uniform/tdac) [preset: 5]")
@click.option("--total", "n_total", type=int, default=None, help="ndtc total budget [default: the uniform budget]")
@click.option("--trajectories", "n_trajectories", type=int, default=None,
              help="FP trajectories to run [default: what the strategy needs]")
@click.option("--with-dc/--no-dc", "with_dc", default=True, show_default=True,
              help="also collect C_DC (distillation set, one sample per student step)")
@click.option("--dc-size", type=int, default=None, help="C_DC rows [default: one per student step, T/2]")
@click.option("--dc-trajectories", type=int, default=None,
              help="stochastic trajectories for C_DC [quick 4, paper 64]")
@click.option("--batch-size", type=int, default=None, help="trajectories per UNet batch [quick 16, paper 64]")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", is_flag=True, help="no progress bar")
@cond_option("for the trajectories")
@friendly
def calibrate(model, out, steps, strategy, preset, n_per_step, every_k, n_total, n_trajectories, with_dc, dc_size,
              dc_trajectories, batch_size, seed, device, quiet, bits=None, pcr_stages=None, cond=None):
    """Collect time-step-aware calibration inputs (z_t, t[, cond]) into safetensors shards + manifest.json."""
    from calibration import CalibConfig, run_calibrate
    from pqcad_export.errors import UsageError
    from pqcad_export.model_io import load_model

    cfg = CalibConfig.preset(preset, steps=steps, strategy=strategy, n_per_step=n_per_step, every_k=every_k,
                             n_total=n_total, n_trajectories=n_trajectories, with_dc=with_dc, dc_size=dc_size,
                             dc_trajectories=dc_trajectories, batch_size=batch_size, seed=seed,
                             pcr_stages=pcr_stages, pcr_preset=preset if strategy == "pcr" else None)
    if strategy == "pcr":
        from pqcad_export.bits import parse_bits

        if not bits:
            raise UsageError("--strategy pcr quantizes while collecting: give --bits (e.g. w4a8)")
        cfg = cfg.with_overrides(pcr_bits=parse_bits(bits))
    from pqcad_export import checks
    from pqcad_export.conditioning import resolve_conditioning
    from pqcad_export.model_io import check_finite

    out_dir = checks.writable_dir(out)
    checks.device(device)
    loaded = load_model(model, device)  # one-line PqcadError before anything is written
    loaded.cond = resolve_conditioning(loaded, cond)
    if loaded.cond is not None:
        click.echo(f"conditioning: {loaded.cond.label}")
    check_finite(loaded, None if loaded.cond is None else loaded.cond.rows(2))  # NaN/inf: refused before any work
    result = run_calibrate(loaded, cfg, out_dir, device=device, quiet=quiet)
    for kind, man in result.items():
        if man is None:
            continue
        steps_kept = len(man["per_step_counts"])
        click.echo(f"{kind}: {man['count']} samples over {steps_kept} steps from {man['n_trajectories']} "
                   f"trajectories -> {out_dir / kind} ({len(man['shards'])} shard(s), {man['collect_seconds']:.1f} s)")
