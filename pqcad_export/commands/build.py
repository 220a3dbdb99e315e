"""`pqcad-export build`: the whole chain into one resumable run directory, ending with a summary table."""

from __future__ import annotations

import click

from engines import BACKENDS

from ..cli import MODEL_HELP, cond_option, friendly, main, quality_options
from ..config_base import choices
from ..distill.choices import CalibLoss, KdTeacher


@main.command()
@click.option("--bits", required=True, help="weight/activation bits: w8a8, w4a8, w4a16 or w8a16")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--out", default=None, type=click.Path(), help="run directory (default: runs/<bits>)")
@click.option("--preset", default=None, type=click.Choice(["quick", "paper"]),
              help="quick (default on CPU): minutes on 2 cores; paper: the paper's hyper-parameters "
                   "(default with --device cuda)")
@click.option("--method", default="pq", show_default=True, type=click.Choice(["pq", "direct", "bitshrink", "rtn"]),
              help="weight quantization: Progressive Quantization, plain kappa-bit, bit-shrinking, or rtn "
                   "(round-to-nearest + MSE scales, nothing learned)")
@click.option("--mixed-precision", default="auto", show_default=True, type=click.Choice(["auto", "off"]),
              help="quant: auto keeps the most sensitive layers' inputs FP16 / weights 8-bit within the budgets")
@click.option("--fp-budget", default=None, type=float, help="quant: max fraction of MACs with FP inputs [0.08]")
@click.option("--w8-budget", default=None, type=float,
              help="quant: max fraction of weights at 8 bits when K < 8 [0.25]")
@click.option("--calib-strategy", default="uniform", show_default=True,
              help="C_QC selection: uniform | ndtc | tdac | pcr (see `calibrate --help`)")
@click.option("--calib-loss", default="em", show_default=True,
              type=click.Choice(choices(CalibLoss)), help="CAD calibration loss")
@click.option("--lambda", "lam", default=None, type=float, help="CAD calibration-loss weight (Eq. 8)")
@click.option("--kd-teacher", default=None, type=click.Choice(choices(KdTeacher)),
              help="CAD's KD target: the 100-step quantized teacher's two DDIM steps (paper, default) or the FP "
                   "model's (not the paper's; the student stays quantized; on the built-in teacher it is the "
                   "better student, docs/RESULTS.md)")
@click.option("--teacher-steps", default=100, show_default=True, help="DDIM steps of the FP / quantized teacher")
@click.option("--student-steps", default=50, show_default=True, help="DDIM steps of the CAD student (= half)")
@click.option("--backend", default="auto", show_default=True,
              help=f"engine: {' | '.join(BACKENDS)}; auto = TensorRT with a GPU, else the faster of ONNX Runtime and "
                   "OpenVINO, measured at build time")
@click.option("--device", default="cpu", show_default=True, help="torch device for calibration/PQ/CAD: cpu | cuda")
@click.option("--seed", default=0, show_default=True)
@click.option("--samples", default=None, type=int, help="compare: images per model (quick 100, paper 10000)")
@click.option("--latency-batch", default=None, type=int, help="compare: batch of the latency runs (default 1)")
@click.option("--include-torch-student", is_flag=True, help="compare: also the PyTorch fake-quant student")
@click.option("--no-fid", is_flag=True, help="compare: latency only (no Inception features)")
@quality_options
@click.option("--recon-loss", default="block", show_default=True, type=click.Choice(["block", "fbr"]),
              help="quant: block (BRECQ) or fbr (EDA-DM: + gamma * layer-wise losses)")
@click.option("--qdrop", default=None, type=float, help="quant: QDrop probability P during LSQ")
@click.option("--quant-iters", default=None, type=int,
              help="quant: AdaRound iterations per block, the budget PQ splits (default: the preset's; paper 20000)")
@click.option("--act-iters", default=None, type=int, help="quant: LSQ iterations per block (default: the preset's)")
@click.option("--distill-iters", default=None, type=int, help="CAD: student updates (default: the preset's)")
@click.option("--relax-frac", default=None, type=float,
              help="compare: also PCR activation relaxing, this fraction (0.05-0.2, PCR: 0.1) of the steps on an "
                   "engine without activation QDQ")
@click.option("--relax-where", default="x0", show_default=True, type=click.Choice(["x0", "xT"]),
              help="relaxed steps nearest x0 (fidelity) or xT (structure)")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="skip finished stages and resume interrupted ones from their checkpoints")
@click.option("--quiet", is_flag=True, help="no progress bars")
@cond_option("for every stage")
@friendly
def build(bits, model, out, preset, method, calib_strategy, calib_loss, lam, kd_teacher, teacher_steps, student_steps,
          backend, device, seed, samples, latency_batch, include_torch_student, no_fid, resume, quiet,
          recon_loss="block", qdrop=None, relax_frac=None, relax_where="x0", quant_iters=None, act_iters=None,
          distill_iters=None, cond=None, mixed_precision="auto", fp_budget=None, w8_budget=None,
          ref_images=None, gates=()):
    """Calibrate -> quantize (PQ) -> distill (CAD) -> export QDQ ONNX (+ lint, parity) -> engine -> compare.

    Everything lands in one run directory (run.json, calib/, quant/, student/, export/, engine/, report/).
    Rerunning the same command skips finished stages; an interrupted stage resumes from its checkpoint.

    Exit codes: 0 success, 1 a failure explained in one line, 2 bad usage, 3 a --gate was missed (the report is
    written first and records each gate's outcome in compare.json).
    """
    from pathlib import Path

    from ..bits import parse_bits
    from ..pipeline.build import run_build
    from ..pipeline.build_config import (BuildConfig, CalibOptions, CompareOptions, DistillOptions, QuantOptions,
                                         budget_overrides)
    from ..pipeline.gate import apply_gates, parse_gates, raise_if_failed
    from ..pipeline.summary import print_summary

    gate_list = parse_gates(gates, no_fid=no_fid)  # malformed / unknown gates: exit 2 before any work
    spec = parse_bits(bits)  # fail on a bad --bits before anything is created
    cfg = BuildConfig(bits=spec.name, model=model, out=out or f"runs/{spec.name}",
                      preset=preset or ("paper" if device.startswith("cuda") else "quick"),
                      teacher_steps=teacher_steps, student_steps=student_steps, backend=backend, device=device,
                      seed=seed, resume=resume, quiet=quiet, cond=cond,
                      calib=CalibOptions(strategy=calib_strategy),
                      quant=QuantOptions(method=method, recon_loss=recon_loss, qdrop=qdrop,
                                         mixed_precision=mixed_precision, fp_budget=fp_budget, w8_budget=w8_budget),
                      distill=DistillOptions(calib_loss=calib_loss, lam=lam, kd_teacher=kd_teacher),
                      compare=CompareOptions(samples=samples, latency_batch=latency_batch,
                                             include_torch_student=include_torch_student, no_fid=no_fid,
                                             relax_frac=relax_frac, relax_where=relax_where, ref_images=ref_images))
    budget = budget_overrides(quant_iters, act_iters, distill_iters)
    cfg.quant.overrides.update(budget.get("quant", {}))
    cfg.distill.overrides.update(budget.get("student", {}))
    summary = run_build(cfg)
    if gate_list:
        summary["compare"] = apply_gates(Path(summary["run"]) / "report" / "compare.json", gate_list)
    print_summary(summary)
    line = raise_if_failed(summary.get("compare"))  # GateFailed: exit 3 with the one-line verdict
    if line:
        click.echo(line)
