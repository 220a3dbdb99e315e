"""Calibration-Assisted Distillation (arXiv 2506.16776, Alg. 4): a 50-step quantized student from the 100-step
quantized teacher, trained with Eq. (8):

    L = w(lambda_t) * ||x_tilde - x_hat_theta(z_t)||^2  +  lambda * D(C_DC at step t, student output at step t)

* KD term (progressive distillation, Salimans & Ho 2022 Alg. 2): each update draws one student step t uniformly,
  a batch of training images x (data-free by default: samples of the FP model), z_t = alpha_t x + sigma_t eps;
  x_tilde is the target from two DDIM steps of the *frozen quantized teacher* (targets.py); w = max(SNR, 1);
  the squared error is a per-element mean. Default error (kd_target="sampler"): the student's real DDIM step
  t -> t'' (x0 clipped as the sampler clips it) against the teacher's z_t'', divided by
  c_t = alpha_t'' - (sigma_t''/sigma_t) alpha_t -- identical to x_hat - x_tilde wherever nothing is clipped, but
  bounded where the teacher's clipped steps make x_tilde explode (|x_tilde| ~ 300 at t=999 for the built-in
  teacher). kd_target="x" is Eq. (8) verbatim; with an eps-predicting UNet it wrecked the student in our quick
  runs (50-step sample MSE to the teacher's 100-step samples 0.056 -> 0.43), so it is opt-in.
* Calibration term: the C_DC rows collected at the same student step t (z_t from stochastic FP trajectories and
  what the FP model predicts there) go through the student in the same forward pass; D (losses.py, EM by
  default) compares the student's x0-prediction (clipped exactly as the DDIM sampler clips it) with the FP
  model's `x0_pred` (cdc_space="x0"; "eps" compares raw outputs with `model_output`). This is the term that lets
  the student match the FP model rather than the quantized teacher's errors. Steps without C_DC rows get only
  the KD term (counted in the log).

Determinism / resume: every random draw of update i comes from a generator seeded with (seed, i), and the
student, Adam state and iteration are checkpointed atomically every `checkpoint_every` updates, so an
interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one (same device/threads).
The student runs in eval mode (no dropout / QDrop noise) while its parameters are trained.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import PqcadError
from .cdc import CdcBank, CdcSource, load_cdc
from .config import CadConfig
from .files import CHECKPOINT, FP_GIVEN, LOG, TRAIN_IMAGES, _digest, _tensor_digest, save_json_atomic
from .images import _fp_model_for, images_from_dataset, images_from_model, training_images
from .student import freeze_student
from .targets import student_grid
from .trainer import CadResult, KdBatch, _Trainer, cad_trainer, kd_weight

__all__ = ["CHECKPOINT", "LOG", "TRAIN_IMAGES", "FP_GIVEN", "CdcBank", "CdcSource", "load_cdc", "CadResult",
           "KdBatch", "kd_weight", "cad_trainer", "images_from_dataset", "images_from_model", "training_images",
           "save_json_atomic", "run_cad", "distill", "distill_fp", "DISTILL_ONLY_META"]


def _check_kd_teacher(cfg: CadConfig, fp_unet: Optional[nn.Module]) -> None:
    if cfg.kd_teacher == "fp" and fp_unet is None:
        raise PqcadError("--kd-teacher fp needs the FP model the quantized teacher was made from (--model)")


def run_cad(teacher: nn.Module, scheduler_config: dict[str, Any], cdc: CdcSource, cfg: CadConfig,
            images: torch.Tensor, out_dir: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu",
            quiet: bool = True, fingerprint: str = "", on_iter: Optional[Callable[[int], None]] = None,
            fp_unet: Optional[nn.Module] = None, student_bits: Optional[int] = 8, cond=None) -> CadResult:
    """Alg. 4 on an nn.Module teacher (quantized wrappers or plain FP). Returns the frozen student.

    A plain FP teacher's student is put on a `student_bits` round-to-nearest grid, or stays FP with None.

    `images`: float [-1, 1] NCHW training images. `out_dir`: checkpoints (`cad_checkpoint.pt`) and `cad_log.json`;
    a checkpoint of the same configuration found there is resumed. `on_iter(i)` runs after update i (tests use it
    to simulate an interruption). With `cfg.gap_samples > 0` the log gets the MSE between the student's 50-step
    samples and the teacher's (and, given `fp_unet`, the FP model's) 100-step samples of the same noise, before
    (= the teacher sampled with 50 steps) and after distillation.
    """
    from ..progress import Progress

    cfg.validate()
    device = torch.device(device)
    _, grid = student_grid(scheduler_config, cfg.teacher_steps)
    bank = load_cdc(cdc, grid)
    if images.dim() != 4 or images.shape[0] == 0:
        raise PqcadError(f"CAD needs a non-empty NCHW image batch, got shape {tuple(images.shape)}")
    _check_kd_teacher(cfg, fp_unet)
    tr = _Trainer(teacher, scheduler_config, bank, cfg, images, device,
                  kd_unet=fp_unet if cfg.kd_teacher == "fp" else None, student_bits=student_bits, cond=cond)
    out = Path(out_dir) if out_dir is not None else None
    ident = {"cfg": cfg.to_dict(), "fingerprint": fingerprint, "images": _tensor_digest(images), "cdc": bank.count}
    if cond is not None:  # (unconditional runs keep their old ids: their checkpoints stay resumable)
        ident["cond"] = cond.fingerprint
    run_id = _digest(ident)
    start, history, resumed_from = 0, [], None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ck_path = out / CHECKPOINT
        if ck_path.is_file():
            try:
                ck = torch.load(ck_path, map_location=device, weights_only=False)
            except Exception as exc:  # a torn/corrupt checkpoint cannot happen with atomic writes, but say so
                raise PqcadError(f"unreadable CAD checkpoint {ck_path}: {exc}; delete it to restart") from None
            if ck.get("extra", {}).get("run_id") == run_id:
                tr.load(ck)
                start, history, resumed_from = int(ck["iter"]), list(ck["history"]), int(ck["iter"])
    eval_set = tr.make_eval_set()
    gap: dict[str, Any] = {}
    if cfg.gap_samples > 0:
        refs = tr.gap_references(cfg.gap_samples, fp_unet)
        gap = {"n": cfg.gap_samples, "before": (ck["extra"]["gap_before"] if resumed_from is not None
                                                else tr.sample_gap(refs, cfg.gap_samples))}
    t0 = time.perf_counter()
    before = tr.evaluate(eval_set) if resumed_from is None else (history[0] if history else {})
    if resumed_from is None:
        history = [dict(before, iter=0, kind="eval")]
    from ..interrupts import deferred
    from .checkpoint import checkpoint_interval

    every = checkpoint_interval(cfg)
    desc = "CAD: distilling" + (f" (resumed at update {start} of {cfg.iters})" if start else "")
    # the bar counts this process's updates only, so its rate is a real rate after a resume
    with Progress(cfg.iters - start, desc, not quiet) as bar, deferred() as stop:
        run = {"loss": 0.0, "kd": 0.0, "calib": 0.0, "n": 0}
        if resumed_from is not None:  # the unfinished log window, so the resumed history is the uninterrupted one
            run = dict(ck["extra"].get("window") or run)
        n_no_cdc = int(ck["extra"].get("n_no_cdc", 0)) if resumed_from is not None else 0

        def save(done: int) -> None:
            st = tr.state(done, history, {"run_id": run_id, "n_no_cdc": n_no_cdc, "gap_before": gap.get("before"),
                                          "window": dict(run)})
            atomic_write(out / CHECKPOINT, lambda tmp, st=st: torch.save(st, tmp))

        done = start
        for it in range(start, cfg.iters):
            rec = tr.step(it)
            n_no_cdc += 0 if rec["has_cdc"] else 1
            for k in ("loss", "kd", "calib"):
                run[k] += rec[k]
            run["n"] += 1
            done = it + 1
            if done % cfg.log_every == 0 or done == cfg.iters:
                history.append({"iter": done, "kind": "train", **{k: run[k] / run["n"] for k in
                                                                   ("loss", "kd", "calib")}})
                run = {"loss": 0.0, "kd": 0.0, "calib": 0.0, "n": 0}
            bar.advance(1)
            try:
                if on_iter is not None:
                    on_iter(done)
            except KeyboardInterrupt:  # between two updates: as safe to keep as a deferred signal
                stop.signum = stop.signum or int(signal.SIGINT)
            if out is not None and done < cfg.iters and (done % every == 0 or stop.requested):
                save(done)  # every `every` updates, and on SIGINT/SIGTERM after the update in flight
            stop.raise_if_requested()
    after = tr.evaluate(eval_set)
    history.append(dict(after, iter=cfg.iters, kind="eval"))
    student = freeze_student(tr.student)
    if gap:
        gap["after"] = tr.sample_gap(refs, cfg.gap_samples)
    log = {
        "config": cfg.to_dict(), "iters": cfg.iters, "resumed_from": resumed_from,
        "seconds": round(time.perf_counter() - t0, 2), "eval_before": before, "eval_after": after,
        "history": history, "student_timesteps": [int(t) for t in grid],
        "cdc": {"rows": bank.count, "steps_with_rows": len(bank.by_t), "rows_off_grid": bank.ignored_rows,
                "space": cfg.cdc_space, "loss": cfg.calib_loss, "lambda": cfg.lam},
        "weights": "integers recomputed as round(latent/delta) on the teacher's frozen per-channel grid; "
                   "unchanged latents keep the teacher's learned (AdaRound) integers",
        "updates_without_cdc_rows": n_no_cdc,
        "sample_gap_mse": gap or None,
    }
    if out is not None:
        save_json_atomic(out / LOG, log)
    return CadResult(student, log)


def distill(quantized, cdc: CdcSource, cfg: Optional[CadConfig] = None, out_dir: Union[str, Path] = "student",
            device: Union[str, torch.device] = "cpu", fp_model=None, quiet: bool = True,
            on_iter: Optional[Callable[[int], None]] = None, cond=None):
    """CAD end to end: quantized 100-step teacher (QuantizedModel or its directory) + C_DC (calibration dir,
    set dir, rows dict or iterable of dict batches) -> quantized 50-step student saved in `out_dir` in the
    quantized format (`steps: 50`) with `cad_log.json`; returns the student as a QuantizedModel.

    Resumes from `out_dir/cad_checkpoint.pt` when one of the same configuration is there."""
    from ..quantize import QuantizedModel, load_quantized, save_quantized

    cfg = cfg or CadConfig.preset("quick")
    cfg.validate()
    if isinstance(quantized, (str, Path)):
        quantized = load_quantized(quantized, device)
    if not isinstance(quantized, QuantizedModel):
        raise PqcadError("distill() needs a QuantizedModel or a quantized model directory")
    cond = _conditioning(quantized.unet, quantized.is_conditional, cond)
    if quantized.steps != cfg.teacher_steps:
        raise PqcadError(f"the quantized teacher samples with {quantized.steps} steps, CAD is configured for "
                         f"{cfg.teacher_steps}; distill a 100-step teacher (or set teacher_steps)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quantized.to(device)
    _, grid = student_grid(quantized.scheduler_config, cfg.teacher_steps)
    bank = load_cdc(cdc, grid, expect_fingerprint=quantized.meta.get("source_fingerprint"))
    if bank.count == 0 and cfg.calib_loss != "none" and cfg.lam > 0:
        raise PqcadError("C_DC is empty; collect it with `pqcad-export calibrate` or use --calib-loss none")
    fp, fp_desc = _fp_model_for(quantized, fp_model, device)
    _check_kd_teacher(cfg, fp)  # before drawing training images
    images, source = training_images(quantized, cfg, out, device, fp, fp_desc, quiet, cond)
    res = run_cad(quantized.unet, quantized.scheduler_config, bank, cfg, images, out, device, quiet,
                  fingerprint=str(quantized.meta.get("fingerprint", "")), on_iter=on_iter, fp_unet=fp, cond=cond)
    student = QuantizedModel(unet=res.student, bits=quantized.bits, method=quantized.method,
                             meta=dict(quantized.meta), log=dict(quantized.log))
    from ..model_io import student_scheduler_config

    meta = {"steps": cfg.teacher_steps // 2,
            "scheduler_config": student_scheduler_config(quantized.scheduler_config, cfg.teacher_steps),
            "conditioning": None if cond is None else cond.describe(), "distillation": {
        "method": "cad", "teacher_steps": cfg.teacher_steps, "teacher_fingerprint": quantized.meta.get("fingerprint"),
        "kd_teacher": cfg.kd_teacher, "calib_loss": cfg.calib_loss, "lambda": cfg.lam, "iters": cfg.iters,
        "training_images": source,
        "cdc_fingerprint": bank.fingerprint, "rounding": res.log["weights"],
        "teacher_scheduler_config": quantized.scheduler_config}}
    save_quantized(student, out, meta)
    _finish(out, res.log, training_images=source, student_fingerprint=student.meta.get("fingerprint"))
    return student


def _conditioning(unet: nn.Module, conditional: bool, cond):
    """A conditional UNet's conditioning: the one given, else the labelled default (conditioning.py)."""
    if not conditional:
        return None
    if cond is None:
        from ..conditioning import cross_attention_dim, default_conditioning

        cond = default_conditioning(cross_attention_dim(unet))
    return cond


def _finish(out: Path, log: dict[str, Any], **fields: Any) -> None:
    """The last step of a finished distillation: the final log (with `fields`), then the checkpoint goes."""
    save_json_atomic(out / LOG, {**log, **fields})
    ck = out / CHECKPOINT
    if ck.exists():
        ck.unlink()


DISTILL_ONLY_META = "distillation.json"


def distill_fp(model, cfg: Optional[CadConfig] = None, out_dir: Union[str, Path] = "student-fp",
               device: Union[str, torch.device] = "cpu", quiet: bool = True,
               on_iter: Optional[Callable[[int], None]] = None):
    """The paper's "FP32 Distill-only" baseline: Alg. 4 with neither quantization nor C_DC, i.e. progressive
    distillation (Salimans & Ho) of the FP 100-step model into an FP 50-step one, with CAD's KD loss, budget and
    data-free training images, so that it differs from the CAD rows only in quantization.

    `model`: a diffusers model directory (None: the built-in teacher) or a LoadedModel. Writes a diffusers model
    directory (unet/, scheduler/, distillation.json, cad_log.json) that load_model and the samplers read (sample
    it with 50 steps); resumes from out_dir/cad_checkpoint.pt like distill(). Returns the student's LoadedModel."""
    from ..model_io import LoadedModel, load_model

    cfg = (cfg or CadConfig.preset("quick")).with_overrides(calib_loss="none", kd_teacher="quantized")
    cfg.validate()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device)
    cond = _conditioning(lm.unet, lm.is_conditional, lm.cond)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # FP_GIVEN keys the cache like the quantized students' images, so one drawn file serves both
    images, source = training_images(lm, cfg, out, device, lm.unet, FP_GIVEN, quiet, cond)
    res = run_cad(lm.unet, lm.scheduler_config, None, cfg, images, out, device, quiet, fingerprint=lm.fingerprint,
                  on_iter=on_iter, student_bits=None, cond=cond)
    res.student.save_pretrained(str(out / "unet"), safe_serialization=True)
    sched = out / "scheduler"
    sched.mkdir(exist_ok=True)
    from ..model_io import student_scheduler_config

    save_json_atomic(sched / "scheduler_config.json", student_scheduler_config(lm.scheduler_config,
                                                                                cfg.teacher_steps))
    save_json_atomic(out / DISTILL_ONLY_META, {
        "steps": cfg.teacher_steps // 2, "method": "distill-only (FP, CAD without quantization or C_DC)",
        "teacher_steps": cfg.teacher_steps, "teacher_fingerprint": lm.fingerprint, "iters": cfg.iters,
        "training_images": source})
    _finish(out, res.log, training_images=source)
    return load_model(out, device)
