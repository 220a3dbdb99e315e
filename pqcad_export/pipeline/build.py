"""`build`: calibrate -> quantize (PQ) -> distill (CAD) -> export (+ lint, parity) -> engine -> compare, into one
run directory (docs/architecture.md, "Run directory"). Each stage is skipped when its inputs did not change and resumes
from its own checkpoints when it was interrupted (per block in PQ, every N iterations in CAD).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from ..bits import BitSpec
from ..errors import PqcadError, UsageError
from ..model_io import LoadedModel
from .build_config import BuildConfig, budget_overrides  # noqa: F401  (re-exported: the build's public names)
from .candidates import run_candidates
from .compare import run_compare
from .conditional import export_configs
from .preflight import load_teacher
from .run_dir import RunDir, stage_key
from .stage_configs import stage_configs


def _say(cfg: BuildConfig, msg: str) -> None:
    if not cfg.quiet:
        from rich.console import Console

        Console(stderr=True).print(msg)


def run_build(cfg: BuildConfig) -> dict[str, Any]:
    """Run (or resume) every stage; returns a summary dict (also written into run.json)."""
    bits = cfg.validate()
    if cfg.backend == "tensorrt":
        from engines.tensorrt import tensorrt_available

        if not tensorrt_available("tensorrt"):
            raise PqcadError("--backend tensorrt requested but the tensorrt package is not installed "
                             "(pip install 'pqcad-export[tensorrt]' on a machine with an NVIDIA GPU)")
    device = torch.device(cfg.device)
    plan = ["calib", "quant", "student", "export", "engine", "report"]
    if cfg.stop_after and cfg.stop_after not in plan:
        raise UsageError(f"unknown stage '{cfg.stop_after}': one of {', '.join(plan)}")
    teacher = load_teacher(cfg, device, plan.index(cfg.stop_after or "report") >= plan.index("student"))
    from .lock import RunLock

    with RunLock(cfg.out):
        return _run_stages(cfg, bits, teacher, device, plan)


def _run_stages(cfg: BuildConfig, bits: BitSpec, teacher: LoadedModel, device: torch.device, plan: list[str]
                ) -> dict[str, Any]:
    run = RunDir.open(cfg.out, teacher.fingerprint, asdict(cfg), resume=cfg.resume)
    cond = teacher.cond
    run.state["conditioning"] = None if cond is None else cond.describe()
    run.save()
    if cond is not None:
        _say(cfg, f"conditioning: {cond.label}")
    keys: dict[str, str] = {}
    t_all = time.time()

    def stage(i: int, name: str, key: str, outputs: tuple[str, ...], body: Callable[[], dict[str, Any]],
              what: str) -> None:
        keys[name] = key
        if cfg.resume and run.is_done(name, key, outputs):
            _say(cfg, f"[bold][{i}/6] {name}[/bold]: {what} — unchanged, skipped")
            return
        _say(cfg, f"[bold][{i}/6] {name}[/bold]: {what}")
        run.start(name, key)
        try:
            info = body()
        except (PqcadError, KeyboardInterrupt) as exc:
            run.fail(name, str(exc) or type(exc).__name__)
            raise
        facts = info.pop("_resume", None) if isinstance(info, dict) else None
        run.finish(name, info, facts)

    sc = stage_configs(cfg, bits)  # built exactly as BuildConfig.validate() built them dry
    ccfg, rcfg, dcfg, ccmp = sc.calib, sc.quant, sc.student, sc.compare
    method = cfg.quant.method

    # 1. calibration: C_QC + C_DC from the FP teacher
    calib_dir = run.path("calib")

    def do_calib():
        from calibration.stage import run_calibrate

        res = run_calibrate(teacher, ccfg, calib_dir, device, quiet=cfg.quiet)
        return {k: (v or {}).get("count") for k, v in res.items()}

    # everything that changes C_QC / C_DC: the weights, the scheduler config, the conditioning, the settings
    ident = [teacher.fingerprint, ccfg.to_dict(), teacher.scheduler_config]
    if cond is not None:
        ident.append(cond.fingerprint)
    stage(1, "calib", stage_key("calib", *ident),
          ("calib/c_qc/manifest.json", "calib/c_dc/manifest.json"), do_calib,
          f"C_QC ({ccfg.strategy}) + C_DC from {cfg.teacher_steps}-step FP trajectories")
    if cfg.stop_after == "calib":
        return _summary(cfg, run, t_all)

    # 2. quantization (PQ by default)
    quant_dir = run.path("quant")

    def do_quant():
        from ..quantize.stage import run_quantize

        qm = run_quantize(teacher, calib_dir, bits, method, rcfg, quant_dir, device, seed=cfg.seed,
                          meta={"steps": cfg.teacher_steps},
                          conditioning=None if cond is None else cond.describe())
        reused = int(qm.log.get("reused_units", 0))
        if reused:
            _say(cfg, f"  reused {reused} of {len(qm.log['units'])} quantized blocks from checkpoints")
        return {"bits": bits.name, "method": method,
                "_resume": {"resumed": reused > 0, "reused_blocks": reused, "blocks": len(qm.log["units"])}}

    stage(2, "quant", stage_key("quant", keys["calib"], bits.name, method, rcfg.key_dict(), cfg.seed),
          ("quant/quant.json",), do_quant, f"{bits.name} block reconstruction, method {method}")
    if cfg.stop_after == "quant":
        return _summary(cfg, run, t_all)

    # 3. distillation (CAD): 100-step quantized teacher -> 50-step quantized student
    student_dir = run.path("student")

    def do_student():
        from ..distill.stage import run_distill

        res = run_distill(quant_dir, calib_dir, dcfg, student_dir, device, fp_model=teacher.unet, cond=cond,
                          quiet=cfg.quiet)
        st, start = res.student, res.log.get("resumed_from")
        if start:
            _say(cfg, f"  resumed CAD from its checkpoint at update {start} of {dcfg.iters}")
        return {"steps": st.steps, "calib_loss": dcfg.calib_loss,
                "_resume": {"resumed": bool(start), "resumed_from_iter": start or 0}}

    stage(3, "student", stage_key("student", keys["quant"], asdict(dcfg)), ("student/quant.json",), do_student,
          f"CAD {cfg.teacher_steps}->{cfg.student_steps} steps, calibration loss {dcfg.calib_loss}, "
          f"KD target {dcfg.kd_teacher}")
    if cfg.stop_after == "student":
        return _summary(cfg, run, t_all)

    # 4. export + TensorRT rule check + ONNX Runtime parity
    onnx_path = run.path("export") / "unet.onnx"
    ecfg, pcfg = export_configs(cond)

    def do_export():
        from ..export.stage import export_quantized

        res = export_quantized(student_dir, onnx_path, ecfg, parity_cfg=pcfg)
        par = res.parity or {}
        return {"onnx": str(onnx_path), "lint_ok": res.lint.get("ok"), "parity_rel_l2": par.get("max_rel_l2"),
                "labels": res.export.get("labels")}

    ekey = stage_key("export", keys["student"], *(() if ecfg is None else (ecfg.to_dict(),)))
    stage(4, "export", ekey, ("export/unet.onnx",), do_export, "QDQ ONNX, TensorRT QDQ rule check, ONNX Runtime parity")
    if cfg.stop_after == "export":
        return _summary(cfg, run, t_all)

    # 5. engine
    engine_dir = run.path("engine")

    def do_engine():
        from engines import EngineError, build_engine

        try:
            info = build_engine(onnx_path, engine_dir, cfg.backend, calib_feeds=_engine_calib_feeds(calib_dir))
        except EngineError as exc:
            raise PqcadError(str(exc)) from None
        return {"backend": info.backend, "notes": info.notes[:3]}

    stage(5, "engine", stage_key("engine", keys["export"], cfg.backend), ("engine/engine.json",), do_engine,
          f"backend {cfg.backend}")
    if cfg.stop_after == "engine":
        return _summary(cfg, run, t_all)

    # 6. compare against the FP32 100-step teacher
    m = cfg.compare

    def do_report():
        cands = run_candidates(run.root, teacher, bits, m.include_torch_student, device, cond)
        if m.relax_frac is not None:  # PCR activation relaxing: INT8 engine + a no-activation-QDQ engine
            from .relax import build_relaxed_engine, relax_candidate

            build_relaxed_engine(run.root, cfg.backend)
            cands.append(relax_candidate(run.root, cands[0], bits, m.relax_frac, m.relax_where))
        rep = run_compare(teacher, cands, run.path("report"), ccmp, quiet=cfg.quiet)
        return {"candidates": [{k: c.get(k) for k in ("name", "ms_per_image", "speedup_vs_reference",
                                                       "fid_to_fp32")} for c in rep["candidates"]]}

    relax_key = () if m.relax_frac is None else ((m.relax_frac, m.relax_where),)
    stage(6, "report", stage_key("report", keys["engine"], asdict(ccmp), m.include_torch_student, *relax_key),
          ("report/compare.json",), do_report, f"latency + FID-to-FP32 on {ccmp.samples} samples vs FP32 "
          f"{cfg.teacher_steps}-step")
    return _summary(cfg, run, t_all)


def _engine_calib_feeds(calib_dir: Path, n: int = 32) -> dict[str, Any]:
    """Real C_QC inputs (spread over the steps) for engines that calibrate extra scales (ORT's CPU copy)."""
    from calibration.storage import open_set

    from ..quantize.stage import calib_keys

    cset = open_set(calib_dir, "c_qc")
    rows = next(cset.iter_batches(batch_size=n, shuffle=True, seed=0, keys=calib_keys(cset)))
    feeds = {"sample": rows["sample"].float().numpy(), "timestep": rows["timestep"].float().numpy()}
    if "encoder_hidden_states" in rows:
        feeds["encoder_hidden_states"] = rows["encoder_hidden_states"].float().numpy()
    return feeds


def _summary(cfg: BuildConfig, run: RunDir, t_all: float) -> dict[str, Any]:
    rows = []
    for name, st in run.state["stages"].items():
        rows.append({"stage": name, "status": st.get("status"), "seconds": st.get("seconds"),
                     "path": str(run.path(name))})
    summary = {"run": str(run.root), "stages": rows, "seconds": round(time.time() - t_all, 1)}
    rep = run.path("report") / "compare.json"
    if rep.is_file():
        summary["compare"] = json.loads(rep.read_text())
    run.state["summary"] = {k: v for k, v in summary.items() if k != "compare"}
    run.save()
    return summary
