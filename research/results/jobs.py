"""Job bodies of the results graph; each runs in its own subprocess (`python -m research.results job NAME`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from pqcad_export.atomic import atomic_write_json
from research import module_env
from research.results.plan import PLANS, Job, Plan, build_jobs

class Ctx:
    def __init__(self, work: Path, plan: Plan, weights: Optional[str], data: Optional[str]):
        import torch

        self.work, self.plan, self.weights, self.data = work, plan, weights, data
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._teacher = None

    @property
    def teacher(self):
        if self._teacher is None:
            from pqcad_export.model_io import load_model

            self._teacher = load_model(None, self.device)
        return self._teacher

    def dir(self, name: str) -> Path:
        return self.work / "jobs" / name


def job_calib(ctx: Ctx, job: Job) -> dict[str, Any]:
    from calibration import CalibConfig, run_calibrate
    from pqcad_export.bits import parse_bits

    p = ctx.plan
    strat = job.params["strategy"]
    extra: dict[str, Any] = {"with_dc": strat == "uniform"}
    if strat == "pcr":
        rec = p.recon_overrides()
        rec.pop("pq")
        extra.update(pcr_bits=parse_bits("w4a8"), pcr_method="pq", pcr_preset="paper", pcr_stages=p.pcr_stages,
                     pcr_recon={**rec, "pq": {"window": p.pq_window}})
    cfg = CalibConfig.preset(p.calib_preset, steps=p.teacher_steps, strategy=strat, seed=p.seed, **extra)
    res = run_calibrate(ctx.teacher, cfg, ctx.dir(job.name), ctx.device, quiet=True)
    return {"counts": {k: (v or {}).get("count") for k, v in res.items()}, "config": cfg.to_dict()}


def job_quant(ctx: Ctx, job: Job) -> dict[str, Any]:
    from pqcad_export.bits import parse_bits
    from pqcad_export.quantize import ReconConfig
    from pqcad_export.quantize.stage import run_quantize

    p = ctx.plan
    calib = job.params.get("calib", "uniform")
    cfg = ReconConfig.preset("paper", **p.recon_overrides(), recon_loss=job.params.get("recon", "block"),
                             mixed_precision=job.params.get("mp", "off"), **job.params.get("recon_overrides", {}))
    out = ctx.dir(job.name)
    t0 = time.time()
    qm = run_quantize(ctx.teacher, ctx.dir(f"calib-{calib}"), parse_bits(job.params["bits"]), job.params["method"],
                      cfg, out, ctx.device, seed=p.seed, meta={"steps": p.teacher_steps})
    if job.params["method"] == "pq":
        from pqcad_export.quantize.progressive import plot_loss_curve

        plot_loss_curve(qm.log, out / "transition_curve.png")
    return {"geomean_pert": qm.log.get("geomean_pert"), "seconds": round(time.time() - t0, 1),
            "transitions": _transitions(qm.log), "recon": cfg.key_dict() | {"pq": asdict(cfg.pq)}}


def _transitions(log: dict) -> dict[str, Any]:
    """Per block: PQ's transition iteration and whether the detector fired or it was forced."""
    return {u["name"]: {"iter": u.get("transition_iter"), "how": u.get("transition")}
            for u in log.get("units", []) if u.get("transition_iter") is not None}


def _copy_training_images(ctx: Ctx, job: Job) -> None:
    """Start a student's dir with the shared CAD images (its `images` job, default cad-images); distill() and
    distill_fp() check the file's key and redraw the images on a mismatch."""
    from pqcad_export.distill.cad import TRAIN_IMAGES

    shared = ctx.dir(job.params.get("images", "cad-images")) / TRAIN_IMAGES
    own = ctx.dir(job.name) / TRAIN_IMAGES
    if shared.is_file() and not own.is_file():
        own.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared, own)


def job_cad(ctx: Ctx, job: Job) -> dict[str, Any]:
    from pqcad_export.distill import run_distill

    cfg = cad_config(ctx, job.params["loss"], job.params.get("overrides"))
    t0 = time.time()
    _copy_training_images(ctx, job)
    run_distill(ctx.dir(job.params["quant"]), ctx.dir("calib-uniform"), cfg, ctx.dir(job.name), ctx.device,
                fp_model=ctx.teacher.unet, quiet=True)
    return _cad_record(ctx, job, t0, "weights")


def job_cad_fp(ctx: Ctx, job: Job) -> dict[str, Any]:
    from pqcad_export.distill.cad import distill_fp

    cfg = cad_config(ctx, "none")
    t0 = time.time()
    _copy_training_images(ctx, job)
    distill_fp(ctx.teacher, cfg, ctx.dir(job.name), ctx.device, quiet=True)
    return _cad_record(ctx, job, t0, "training_images")


def _cad_record(ctx: Ctx, job: Job, t0: float, *keys: str) -> dict[str, Any]:
    """A finished student's record: its time, the configuration it trained with (from its log, which holds what
    distill_fp forced too) and the log's held-out losses, sample gaps and `keys`."""
    log = json.loads((ctx.dir(job.name) / "cad_log.json").read_text())
    return {"seconds": round(time.time() - t0, 1), "config": log["config"],
            "log_summary": {k: log.get(k) for k in ("eval_before", "eval_after", "sample_gap_mse", *keys)}}


def cad_config(ctx: Ctx, loss: str, overrides: Optional[dict[str, Any]] = None):
    from pqcad_export.distill.config import CadConfig

    p = ctx.plan
    kw = dict(iters=p.cad_iters, batch_size=p.cad_batch, n_train_images=p.cad_train_images,
              checkpoint_every=p.cad_checkpoint_every, calib_loss=loss, seed=p.seed, teacher_steps=p.teacher_steps)
    return CadConfig.preset("paper", **{**kw, **p.cad_extra, **(overrides or {})})


def job_cad_images(ctx: Ctx, job: Job) -> dict[str, Any]:
    """CAD's data-free training images (FP teacher samples), drawn once for every student instead of once each."""
    from pqcad_export.distill.cad import FP_GIVEN, training_images

    t = ctx.teacher
    t0 = time.time()
    cfg = cad_config(ctx, "em", job.params.get("overrides"))
    imgs, source = training_images(t, cfg, ctx.dir(job.name), ctx.device, t.unet, FP_GIVEN)
    return {"images": int(imgs.shape[0]), "source": source, "seconds": round(time.time() - t0, 1)}


def job_timing(ctx: Ctx, job: Job) -> dict[str, Any]:
    out = ctx.dir(job.name) / "timing.json"
    cmd = [sys.executable, "-m", "research.time_reconstruction", "--device", str(ctx.device),
           "--iters", "2000", "--act-iters", "500", "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=module_env())
    return json.loads(out.read_text())


def _extractor(ctx: Ctx):
    from pqcad_export.metrics import InceptionFeatures

    return InceptionFeatures(ctx.weights, device=ctx.device)


def _model_fn(ctx: Ctx, spec: dict[str, Any]):
    """(unet callable, scheduler config) for an evaluated row."""
    import copy

    from pqcad_export.quantize import load_quantized
    from pqcad_export.sampling import TorchUNet

    if spec["type"] == "fp":
        return TorchUNet(ctx.teacher.unet), ctx.teacher.scheduler_config, {}
    if spec["type"] == "fp_dir":  # an FP model written as a diffusers directory (the Distill-only student)
        from pqcad_export.model_io import load_model

        lm = load_model(ctx.dir(spec["dir"]), ctx.device)
        return TorchUNet(lm.unet), lm.scheduler_config, {}
    q = load_quantized(ctx.dir(spec["dir"]), ctx.device)
    if spec["type"] != "relax":
        return q, q.scheduler_config, {}
    from engines.relax import RelaxedUNet, relaxed_timesteps
    from pqcad_export.quantize.wrap import set_act_quant
    from pqcad_export.sampling import ddim_timesteps

    relaxed = copy.deepcopy(q)
    set_act_quant(relaxed.unet, False)  # the relaxed engine: same integer weights, fp32 activations
    grid = [int(t) for t in ddim_timesteps(q.scheduler_config, spec["steps"])]
    ts = relaxed_timesteps(grid, spec["frac"], spec["where"])
    fn = RelaxedUNet(q, relaxed, ts, q.bits.act_bits, 32)
    return fn, q.scheduler_config, {"relaxed_timesteps": ts, "average_act_bits": fn.average_act_bits(spec["steps"])}


def _fid_or_note(key: str, compute, notes: list[str]) -> Optional[float]:
    """A Frechet distance rounded for the report, or None with a note when it cannot be computed (e.g. far fewer
    samples than feature dimensions in the smoke plan)."""
    from pqcad_export.errors import PqcadError

    try:
        return round(float(compute()), 4)
    except PqcadError as exc:
        notes.append(f"{key}: {exc}")
        return None


class Waiting(Exception):
    """A job that did what it could and needs an input that has not arrived yet (the scheduler runs it again)."""


WAITING_RC = 75


def job_eval(ctx: Ctx, job: Job) -> dict[str, Any]:
    """10k samples from the shared initial noise -> uint8 images (saved first: sampling needs no FID weights, so it
    runs while they are still arriving), then pool3 features and sFID statistics."""
    import numpy as np
    import torch

    from pqcad_export.metrics import feature_stats
    from pqcad_export.sampling import SamplerConfig, ddim_sample, to_uint8

    p, spec = ctx.plan, job.params
    out = ctx.dir(job.name)
    out.mkdir(parents=True, exist_ok=True)
    sampled = out / "sampled.json"
    if not sampled.is_file():
        fn, sched, extra = _model_fn(ctx, spec)
        t0 = time.time()
        imgs = ddim_sample(fn, sched, ctx.teacher.sample_shape, p.samples,
                           SamplerConfig(steps=spec["steps"], eta=0.0, batch_size=p.sample_batch, seed=p.seed),
                           device=ctx.device)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t_sample = time.time() - t0
        if not torch.isfinite(imgs).all():
            raise RuntimeError(f"{spec['model']} produced non-finite samples")
        np.save(out / "images.npy", to_uint8(imgs).numpy())
        atomic_write_json(sampled, {"sampling_seconds": round(t_sample, 1), "steps": spec["steps"],
                              "samples": int(imgs.shape[0]), **extra})
    if not weights_ready(ctx.weights):
        raise Waiting("FID weights not there yet")
    u8 = np.load(out / "images.npy")
    ext = _extractor(ctx)
    pool, spatial = ext.features(u8, batch_size=p.feature_batch, spatial=True)
    np.save(out / "pool.npy", pool.astype(np.float32))
    mu_s, sig_s = feature_stats(spatial)
    np.savez(out / "spatial_stats.npz", mu=mu_s, sigma=sig_s)
    return {**json.loads(sampled.read_text()), "notes": [], "fid_features": ext.id}


def job_refstats(ctx: Ctx, job: Job) -> dict[str, Any]:
    """Reference pool3 / sFID statistics of the training images and a seeded subset of their features for P/R."""
    import numpy as np

    from pqcad_export.data import load_images
    from pqcad_export.metrics import feature_stats

    out = ctx.dir(job.name)
    out.mkdir(parents=True, exist_ok=True)
    c, h, _ = ctx.teacher.sample_shape
    imgs = load_images(ctx.data, size=h, channels=c)
    if ctx.plan.name == "smoke":
        imgs = imgs[:64]
    ext = _extractor(ctx)
    pool, spatial = ext.features(imgs, batch_size=ctx.plan.feature_batch, spatial=True)
    mu, sig = feature_stats(pool)
    mu_s, sig_s = feature_stats(spatial)
    rng = np.random.default_rng(ctx.plan.seed)
    pick = rng.choice(len(pool), size=min(ctx.plan.pr_real, len(pool)), replace=False)
    np.savez(out / "ref.npz", mu=mu, sigma=sig, mu_s=mu_s, sigma_s=sig_s, pr_real=pool[pick].astype(np.float32))
    return {"count": int(len(imgs)), "source": str(ctx.data or "fashion-mnist train (padded 28->32)"),
            "fid_features": ext.id}


def job_score(ctx: Ctx, job: Job) -> dict[str, Any]:
    import numpy as np
    import torch

    from pqcad_export.metrics import feature_stats, fid_from_features, fid_from_stats, precision_recall

    ref = np.load(ctx.dir("refstats") / "ref.npz")
    ev = ctx.dir(f"eval-{job.params['model']}")
    pool = np.load(ev / "pool.npy").astype(np.float64)
    sp = np.load(ev / "spatial_stats.npz")
    evald = json.loads((ev / "done.json").read_text())
    out: dict[str, Any] = {**evald, "notes": list(evald.get("notes", []))}
    out["fid_to_fp32"] = 0.0 if job.params["model"] == "fp32-100" else _fid_or_note(
        "fid_to_fp32", lambda: fid_from_features(pool, np.load(ctx.dir("eval-fp32-100") / "pool.npy")), out["notes"])
    out["fid"] = _fid_or_note("fid", lambda: fid_from_stats(feature_stats(pool), (ref["mu"], ref["sigma"])),
                              out["notes"])
    out["sfid"] = _fid_or_note("sfid", lambda: fid_from_stats((sp["mu"], sp["sigma"]), (ref["mu_s"], ref["sigma_s"])),
                               out["notes"])
    n = min(len(pool), len(ref["pr_real"]))
    # float32 distances on a GPU (10k x 10k), float64 on a CPU (the function's default precision)
    dtype = torch.float32 if ctx.device.type == "cuda" else torch.float64
    pr = precision_recall(ref["pr_real"][:n], pool[:n], k=3, device=ctx.device, dtype=dtype)
    out.update(precision=round(pr.precision, 4), recall=round(pr.recall, 4))
    return out


JOB_BODIES = {"calib": job_calib, "quant": job_quant, "cad_images": job_cad_images, "cad": job_cad,
              "cad_fp": job_cad_fp, "timing": job_timing, "eval": job_eval, "refstats": job_refstats,
              "score": job_score}



_WEIGHTS_OK: set = set()


def weights_ready(weights: Optional[str]) -> bool:
    """The FID weights are there and intact (they may arrive in parts while training jobs run)."""
    from pqcad_export.metrics.inception import find_weights, is_known_weights

    if weights in _WEIGHTS_OK:
        return True
    try:
        path = find_weights(weights)
    except Exception:
        return False
    if weights and not is_known_weights(path):
        return False
    _WEIGHTS_OK.add(weights)
    return True


def cmd_job(args) -> int:
    work = Path(args.work)
    plan = PLANS[args.plan]
    jobs = build_jobs(plan, timing=True)
    job = jobs[args.name]
    ctx = Ctx(work, plan, args.weights, args.data)
    d = ctx.dir(job.name)
    d.mkdir(parents=True, exist_ok=True)
    pid = d / "pid"
    pid.write_text(str(os.getpid()))
    t0 = time.time()
    try:
        res = JOB_BODIES[job.kind](ctx, job)
        res["job_seconds"] = round(time.time() - t0, 1)
        res["device"] = device_name(ctx)
        atomic_write_json(d / "done.json", res)
        return 0
    except Waiting as exc:
        print(f"{job.name}: waiting: {exc}", flush=True)
        return WAITING_RC
    except Exception as exc:  # recorded for the collector; the scheduler does not retry
        traceback.print_exc()
        atomic_write_json(d / "failed.json", {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        pid.unlink(missing_ok=True)


def device_name(ctx: Ctx) -> str:
    import torch

    if ctx.device.type == "cuda":
        return torch.cuda.get_device_name(ctx.device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


