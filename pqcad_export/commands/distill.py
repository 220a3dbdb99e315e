"""`pqcad-export distill`: CAD (arXiv 2506.16776 Alg. 4): a 50-step quantized student from the 100-step quantized
teacher, with the C_DC calibration loss of Eq. (8)."""

from __future__ import annotations

import click

from ..cli import PRESETS, cond_option, friendly, main
from ..config_base import choices
from ..distill.choices import CalibLoss, KdTeacher, KdWeighting


@main.command()
@click.option("--quantized", required=True, type=click.Path(), help="quantized 100-step teacher (quantize --out)")
@click.option("--calib", required=True, type=click.Path(),
              help="calibration directory with c_dc/ (calibrate --out), or the C_DC set directory")
@click.option("--out", required=True, type=click.Path(), help="output directory for the 50-step student")
@click.option("--calib-loss", default=None, type=click.Choice(choices(CalibLoss)),
              help="distance between student outputs and C_DC (default em; swd = sliced EM for big batches)")
@click.option("--lambda", "lam", default=None, type=float, help="weight of the calibration term of Eq. (8)")
@click.option("--kd-weighting", default=None, type=click.Choice(choices(KdWeighting)),
              help="w(lambda_t) of Eq. (8): truncated_snr = max(SNR, 1) (paper, default); snr = the eps-space MSE "
                   "(with an eps-predicting UNet, max(SNR, 1) gives the noisiest steps most of the gradient; "
                   "docs/RESULTS.md, CAD)")
@click.option("--kd-teacher", default=None, type=click.Choice(choices(KdTeacher)),
              help="whose two DDIM steps the student learns to take in one: quantized = the 100-step quantized "
                   "teacher (paper, default); fp = the FP model it was made from (see --model), the student "
                   "stays quantized (docs/RESULTS.md, CAD)")
@click.option("--preset", default="quick", show_default=True, type=PRESETS)
@click.option("--iters", default=None, type=int, help="student updates (default: the preset's)")
@click.option("--batch-size", default=None, type=int, help="training images per update (default: the preset's)")
@click.option("--model", default=None,
              help="FP model the data-free training images are sampled from, and the KD target with --kd-teacher "
                   "fp (default: the built-in teacher when the quantized model was made from it, else none: the "
                   "quantized teacher draws the images)")
@click.option("--data", default=None, help="train on images from this dataset path instead of data-free samples")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", default=None, type=int, help="random seed (default 0)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@cond_option("for the training images, as given to calibrate")
@friendly
def distill(quantized, calib, out, calib_loss, lam, kd_weighting, kd_teacher, preset, iters, batch_size, model, data,
            device, seed, quiet, cond=None):
    """Distill the quantized teacher into a quantized student that needs half the DDIM steps (CAD).

    Resumes from OUT/cad_checkpoint.pt after an interruption; writes the student in the quantized format
    (steps: 50) plus OUT/cad_log.json.
    """
    from ..distill import CadConfig, run_distill

    from .. import checks

    cfg = CadConfig.preset(preset, calib_loss=calib_loss, lam=lam, kd_weighting=kd_weighting, kd_teacher=kd_teacher,
                           iters=iters, batch_size=batch_size, dataset=data, seed=seed)
    checks.writable_dir(out)
    checks.device(device)
    res = run_distill(quantized, calib, cfg, out, device, fp_model=model, cond=cond, quiet=quiet)
    student, log = res.student, res.log
    b, a = log["eval_before"], log["eval_after"]
    click.echo(f"student: {student.bits.name}, {student.steps} steps -> {out}")
    click.echo(f"CAD loss on the fixed eval batch: {b['loss']:.4g} -> {a['loss']:.4g} "
               f"(KD {b['kd']:.4g} -> {a['kd']:.4g}, {cfg.calib_loss} {b['calib']:.4g} -> {a['calib']:.4g}); "
               f"{log['iters']} updates in {log['seconds']:.0f}s; training images: {log['training_images']}")
    gap = log.get("sample_gap_mse")
    if gap:
        parts = [f"{k} {gap['before'][k]:.4g} -> {gap['after'][k]:.4g}" for k in gap["before"]]
        click.echo(f"50-step sample MSE vs 100-step references ({gap['n']} images), teacher-at-50 -> student: "
                   + "; ".join(parts))
