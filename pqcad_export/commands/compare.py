"""`pqcad-export compare`: engine latency and FID against the FP32 100-step model."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import cond_option, friendly, main, quality_options


@main.command()
@click.option("--run", "run_dir", default=None, type=click.Path(), help="a build run directory")
@click.option("--engine", "engine_dir", default=None, type=click.Path(), help="an engine directory (engine --out)")
@click.option("--model", default=None, help="with --engine: the FP teacher the engine was made from "
              "(default: the built-in teacher)")
@click.option("--steps", default=50, show_default=True, help="with --engine: DDIM steps the engine samples with")
@click.option("--samples", default=None, type=int, help="images per model for FID-to-FP32 (quick 100)")
@click.option("--batch-size", default=None, type=int, help="sampling and latency batch (quick 25)")
@click.option("--latency-batch", default=None, type=int, help="batch of the latency runs (default 1)")
@click.option("--teacher-steps", default=100, show_default=True)
@click.option("--out", default=None, type=click.Path(), help="report directory (default: RUN/report or ./report)")
@click.option("--include-torch-student", is_flag=True, help="with --run: also the PyTorch fake-quant student")
@click.option("--ref-stats", default=None, type=click.Path(),
              help="data statistics for fid/kid: a refstats folder, or an .npz with mu, sigma[, features]")
@quality_options
@click.option("--fid-weights", default=None, type=click.Path(), help="TF-Inception default_1.pt")
@click.option("--no-fid", is_flag=True, help="latency only")
@click.option("--preset", default="quick", show_default=True, type=click.Choice(["quick", "paper"]))
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", is_flag=True)
@cond_option("to sample with, with --engine (a run uses its own)")
@friendly
def compare(run_dir, engine_dir, model, steps, samples, batch_size, latency_batch, teacher_steps, out, include_torch_student,
            ref_stats, fid_weights, no_fid, preset, device, seed, quiet, cond=None, ref_images=None, gates=()):
    """Measure unet_ms_per_call, ms_per_image, FID, KID and FID/KID/PSNR/SSIM-to-FP32 of a run's engine (or
    ENGINE + MODEL) against the FP32 teacher with 100 DDIM steps; writes compare.json, compare.png and samples.png.

    Exit codes: 0 success, 1 a failure explained in one line, 2 bad usage, 3 a --gate was missed (the report is
    written first and records each gate's outcome).
    """
    import json

    import torch

    from ..errors import PqcadError, UsageError
    from ..model_io import load_model
    from ..pipeline.candidates import run_candidates
    from ..pipeline.compare import Candidate, CompareConfig, run_compare
    from ..pipeline.summary import print_summary
    from ..pipeline.gate import apply_gates, parse_gates, raise_if_failed

    gate_list = parse_gates(gates, no_fid=no_fid)  # malformed / unknown gates: exit 2 before any work
    if bool(run_dir) == bool(engine_dir):
        raise UsageError("give either --run DIR or --engine DIR (with --model DIR)")
    from .. import checks

    for flag, v in (("--samples", samples), ("--batch-size", batch_size), ("--latency-batch", latency_batch),
                    ("--steps", steps), ("--teacher-steps", teacher_steps)):
        checks.positive(flag, v)
    if out:
        checks.writable_dir(out)
    checks.device(device)
    for flag, f in (("--ref-stats", ref_stats), ("--fid-weights", fid_weights), ("--ref-images", ref_images)):
        if f and f != "fashion-mnist" and not Path(f).exists():  # --ref-stats may be a refstats folder
            raise UsageError(f"{flag} {f}: no such file or folder")
    if run_dir and cond:
        raise UsageError("--cond goes with --engine; a run uses the conditioning it was built with")
    cfg = CompareConfig.preset(preset, samples=samples, batch_size=batch_size, latency_batch=latency_batch,
                               teacher_steps=teacher_steps,
                               device=device, seed=seed, ref_stats=ref_stats, fid_weights=fid_weights, no_fid=no_fid,
                               ref_images=ref_images)
    if run_dir:
        rj = Path(run_dir) / "run.json"
        if not rj.is_file():
            raise PqcadError(f"not a run directory (no run.json): {run_dir}")
        state = json.loads(rj.read_text())
        teacher = load_model(model or state["config"].get("model"), device)
        if state.get("model_fingerprint") not in (None, teacher.fingerprint):
            raise PqcadError(f"run {run_dir} was made by a different model than {teacher.path}")
        from ..bits import parse_bits
        from ..conditioning import from_record

        teacher.cond = from_record(teacher, state.get("conditioning"))
        cands = run_candidates(Path(run_dir), teacher, parse_bits(state["config"]["bits"]), include_torch_student,
                               torch.device(device), teacher.cond)
        out = out or str(Path(run_dir) / "report")
    else:
        from engines import EngineError, engine_bytes, load_engine

        from ..conditioning import resolve_conditioning
        from ..pipeline.compare import check_engine_model

        teacher = load_model(model, device)
        teacher.cond = resolve_conditioning(teacher, cond)
        try:
            eng = load_engine(engine_dir)
        except EngineError as exc:
            raise PqcadError(str(exc)) from None
        notes = check_engine_model(eng.info, teacher, engine_dir)
        if eng.sample_shape and tuple(eng.sample_shape) != tuple(teacher.sample_shape):
            raise PqcadError(f"engine {engine_dir} takes {tuple(eng.sample_shape)} inputs, model {teacher.path} "
                             f"samples {teacher.sample_shape}: mismatched engine")
        sched = teacher.scheduler_config
        if steps * 2 == teacher_steps:  # a CAD student samples every other point of the teacher's grid
            from ..model_io import student_scheduler_config

            sched = student_scheduler_config(sched, teacher_steps)
        from ..sampling import with_cond

        size = engine_bytes(engine_dir)
        cands = [Candidate(name=f"{eng.backend}-engine", backend=eng.backend, precision="see engine.json",
                           steps=steps, unet=with_cond(eng, teacher.cond), model_bytes=size, scheduler_config=sched,
                           executed_on=eng.device.type, notes=list(eng.info.notes) + notes,
                           extra={"engine_dir": str(engine_dir)})]
        out = out or "report"
    rep = run_compare(teacher, cands, out, cfg, quiet=quiet)
    rep = apply_gates(Path(out) / "compare.json", gate_list) or rep
    print_summary({"run": run_dir or engine_dir, "stages": [], "compare": rep, "report_dir": out})
    line = raise_if_failed(rep)  # GateFailed: exit 3 with the one-line verdict
    if line:
        click.echo(line)
