"""`build`: calibrate -> quantize (PQ) -> distill (CAD) -> export (+ lint, parity) -> engine -> compare, into one
run directory (ARCHITECTURE.md "Run directory"). Each stage is skipped when its inputs did not change and resumes
from its own checkpoints when it was interrupted (per block in PQ, every N iterations in CAD).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..bits import BitSpec, parse_bits
from ..errors import PqcadError, UsageError
from ..model_io import LoadedModel, load_model
from .compare import Candidate, CompareConfig, run_compare
from .run_dir import RunDir, stage_key

from engines import BACKENDS  # noqa: E402  (one list: engines.Backend)


@dataclass
class BuildConfig:
    bits: str = "w4a8"
    model: Optional[str] = None              # None = built-in teacher
    out: str = "runs/w4a8"
    preset: str = "quick"
    method: str = "pq"                       # pq | direct | bitshrink
    calib_strategy: str = "uniform"
    calib_loss: str = "em"
    lam: Optional[float] = None
    kd_teacher: Optional[str] = None         # CAD's KD target: None = the preset's (quantized, paper) | fp
    teacher_steps: int = 100
    student_steps: int = 50
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    samples: Optional[int] = None            # compare: images per model (None = preset)
    compare_batch: Optional[int] = None
    latency_batch: Optional[int] = None
    include_torch_student: bool = False
    no_fid: bool = False
    resume: bool = True
    quiet: bool = False
    stop_after: Optional[str] = None         # run stages up to and including this one (debugging, tests)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-stage config overrides (budgets, tests)
    recon_loss: str = "block"                # quant: block | fbr (EDA-DM fine-grained block reconstruction)
    qdrop: Optional[float] = None            # quant: QDrop probability in the LSQ phase (None = preset's)
    relax_frac: Optional[float] = None       # compare: + PCR activation-relaxing candidate (0.05-0.2 of steps)
    relax_where: str = "x0"                  # x0 (fidelity) | xT (structure): which end of the trajectory

    def validate(self) -> BitSpec:
        bits = parse_bits(self.bits)
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown backend '{self.backend}': expected one of {', '.join(BACKENDS)}")
        if self.method not in ("pq", "direct", "bitshrink"):
            raise UsageError(f"unknown method '{self.method}': expected pq, direct or bitshrink")
        if self.student_steps * 2 != self.teacher_steps:
            raise UsageError(f"CAD halves the steps: --student-steps must be --teacher-steps / 2 "
                             f"({self.teacher_steps} / 2), got {self.student_steps}")
        if self.preset not in ("quick", "paper"):
            raise UsageError(f"unknown preset '{self.preset}': expected quick or paper")
        if self.relax_frac is not None:
            from .relax import check_relax

            check_relax(self.relax_frac, self.relax_where)
        return bits


def budget_overrides(quant_iters: Optional[int] = None, act_iters: Optional[int] = None,
                     distill_iters: Optional[int] = None) -> dict[str, dict[str, Any]]:
    """BuildConfig.overrides for an iteration budget (the preset's algorithm, fewer iterations); None keeps the
    preset's value."""
    for flag, v in (("--quant-iters", quant_iters), ("--act-iters", act_iters), ("--distill-iters", distill_iters)):
        if v is not None and v < 0:
            raise UsageError(f"{flag} must be >= 0, got {v}")
    quant = {k: v for k, v in (("iters", quant_iters), ("act_iters", act_iters)) if v is not None}
    student = {"iters": distill_iters} if distill_iters is not None else {}
    return {k: v for k, v in (("quant", quant), ("student", student)) if v}


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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PqcadError("--device cuda requested but CUDA is not available")
    teacher = load_model(cfg.model, device)
    run = RunDir.open(cfg.out, teacher.fingerprint, asdict(cfg), resume=cfg.resume)
    keys: dict[str, str] = {}
    t_all = time.time()
    plan = ["calib", "quant", "student", "export", "engine", "report"]
    if cfg.stop_after and cfg.stop_after not in plan:
        raise UsageError(f"unknown stage '{cfg.stop_after}': one of {', '.join(plan)}")

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
        run.finish(name, info)

    # 1. calibration: C_QC + C_DC from the FP teacher
    from calibration.config import CalibConfig

    qover = dict(cfg.overrides.get("quant", {}))
    if cfg.recon_loss != "block":
        qover.setdefault("recon_loss", cfg.recon_loss)
    if cfg.qdrop is not None:
        qover.setdefault("qdrop_prob", cfg.qdrop)
    pcr = {}
    if cfg.calib_strategy == "pcr":  # PCR quantizes between stages: same bits, method and settings as stage 2
        pcr = {"pcr_bits": bits.name, "pcr_method": cfg.method, "pcr_preset": cfg.preset, "pcr_recon": qover}
    ccfg = CalibConfig.preset(cfg.preset, steps=cfg.teacher_steps, strategy=cfg.calib_strategy, seed=cfg.seed,
                              **{**pcr, **cfg.overrides.get("calib", {})})
    calib_dir = run.path("calib")

    def do_calib():
        from calibration.collect import calibrate

        res = calibrate(teacher, ccfg, calib_dir, device, quiet=cfg.quiet)
        return {k: (v or {}).get("count") for k, v in res.items()}

    stage(1, "calib", stage_key("calib", teacher.fingerprint, ccfg.to_dict()),
          ("calib/c_qc/manifest.json", "calib/c_dc/manifest.json"), do_calib,
          f"C_QC ({ccfg.strategy}) + C_DC from {cfg.teacher_steps}-step FP trajectories")
    if cfg.stop_after == "calib":
        return _summary(cfg, run, t_all)

    # 2. quantization (PQ by default)
    from ..quantize import ReconConfig, quantize_model, save_quantized

    # --quiet silences the per-block bars too (progress is not part of the stage key)
    rcfg = ReconConfig.preset(cfg.preset, **{**qover, **({"progress": False} if cfg.quiet else {})})
    quant_dir = run.path("quant")

    def do_quant():
        from calibration.storage import open_set

        cset = open_set(calib_dir, "c_qc", expect_fingerprint=teacher.fingerprint)
        # shuffled: the quick preset keeps only the first max_calib rows, which must span all steps
        batches = cset.iter_batches(batch_size=64, shuffle=True, seed=cfg.seed, keys=_calib_keys(cset))
        qm = quantize_model(teacher, batches, bits, cfg.method, rcfg, device,
                            checkpoint_dir=quant_dir / "checkpoints")
        save_quantized(qm, quant_dir, {"steps": cfg.teacher_steps})
        return {"bits": bits.name, "method": cfg.method}

    stage(2, "quant", stage_key("quant", keys["calib"], bits.name, cfg.method, rcfg.fingerprint(), cfg.seed),
          ("quant/quant.json",), do_quant, f"{bits.name} block reconstruction, method {cfg.method}")
    if cfg.stop_after == "quant":
        return _summary(cfg, run, t_all)

    # 3. distillation (CAD): 100-step quantized teacher -> 50-step quantized student
    from ..distill.config import CadConfig

    dover = dict(cfg.overrides.get("student", {}))
    dcfg = CadConfig.preset(cfg.preset, calib_loss=cfg.calib_loss, lam=cfg.lam, kd_teacher=cfg.kd_teacher,
                            seed=cfg.seed, teacher_steps=cfg.teacher_steps, **dover)
    student_dir = run.path("student")

    def do_student():
        from ..distill.cad import distill

        st = distill(quant_dir, calib_dir, dcfg, student_dir, device, fp_model=teacher.unet, quiet=cfg.quiet)
        return {"steps": st.steps, "calib_loss": dcfg.calib_loss}

    stage(3, "student", stage_key("student", keys["quant"], asdict(dcfg)), ("student/quant.json",), do_student,
          f"CAD {cfg.teacher_steps}->{cfg.student_steps} steps, calibration loss {dcfg.calib_loss}, "
          f"KD target {dcfg.kd_teacher}")
    if cfg.stop_after == "student":
        return _summary(cfg, run, t_all)

    # 4. export + TensorRT rule check + ONNX Runtime parity
    onnx_path = run.path("export") / "unet.onnx"

    def do_export():
        from ..export.stage import export_quantized

        res = export_quantized(student_dir, onnx_path)
        par = res.parity or {}
        return {"onnx": str(onnx_path), "lint_ok": res.lint.get("ok"), "parity_rel_l2": par.get("max_rel_l2"),
                "labels": res.export.get("labels")}

    stage(4, "export", stage_key("export", keys["student"]), ("export/unet.onnx",), do_export,
          "QDQ ONNX, TensorRT QDQ rule check, ONNX Runtime parity")
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
    ccmp = CompareConfig.preset(cfg.preset, seed=cfg.seed, device=cfg.device, samples=cfg.samples,
                                batch_size=cfg.compare_batch, latency_batch=cfg.latency_batch,
                                teacher_steps=cfg.teacher_steps, no_fid=cfg.no_fid)

    def do_report():
        cands = run_candidates(run.root, teacher, bits, cfg.include_torch_student, device)
        if cfg.relax_frac is not None:  # PCR activation relaxing: INT8 engine + a no-activation-QDQ engine
            from .relax import build_relaxed_engine, relax_candidate

            build_relaxed_engine(run.root, cfg.backend)
            cands.append(relax_candidate(run.root, cands[0], bits, cfg.relax_frac, cfg.relax_where))
        rep = run_compare(teacher, cands, run.path("report"), ccmp, quiet=cfg.quiet)
        return {"candidates": [{k: c.get(k) for k in ("name", "ms_per_image", "speedup_vs_reference",
                                                       "fid_to_fp32")} for c in rep["candidates"]]}

    relax_key = () if cfg.relax_frac is None else ((cfg.relax_frac, cfg.relax_where),)
    stage(6, "report", stage_key("report", keys["engine"], asdict(ccmp), cfg.include_torch_student, *relax_key),
          ("report/compare.json",), do_report, f"latency + FID-to-FP32 on {ccmp.samples} samples vs FP32 "
          f"{cfg.teacher_steps}-step")
    return _summary(cfg, run, t_all)


def _engine_calib_feeds(calib_dir: Path, n: int = 32) -> dict[str, Any]:
    """Real C_QC inputs (spread over the steps) for engines that calibrate extra scales (ORT's CPU copy)."""
    from calibration.storage import open_set

    cset = open_set(calib_dir, "c_qc")
    rows = next(cset.iter_batches(batch_size=n, shuffle=True, seed=0, keys=_calib_keys(cset)))
    feeds = {"sample": rows["sample"].float().numpy(), "timestep": rows["timestep"].float().numpy()}
    if "encoder_hidden_states" in rows:
        feeds["encoder_hidden_states"] = rows["encoder_hidden_states"].float().numpy()
    return feeds


def _calib_keys(cset) -> list[str]:
    return [k for k in ("sample", "timestep", "encoder_hidden_states") if k in cset.fields]


def run_candidates(root: Path, teacher: LoadedModel, bits: BitSpec, include_torch_student: bool,
                   device: torch.device) -> list[Candidate]:
    """The engine of a run directory (and optionally its PyTorch fake-quant student) as compare candidates."""
    from engines import EngineError, load_engine
    from engines.manifest import read_manifest

    from ..quantize import load_quantized

    student_dir, engine_dir = root / "student", root / "engine"
    if not (student_dir / "quant.json").is_file():
        raise PqcadError(f"{root} has no finished student (student/quant.json); run build first")
    student = load_quantized(student_dir, device)
    sched = student.scheduler_config
    ib = _int_weight_bytes(student)
    cands = []
    if (engine_dir / "engine.json").is_file():
        info = read_manifest(engine_dir)
        try:
            eng = load_engine(engine_dir)
        except EngineError as exc:
            raise PqcadError(str(exc)) from None
        size = sum(f.stat().st_size for f in engine_dir.iterdir() if f.is_file() and f.name != "engine.json")
        cands.append(Candidate(name=f"{bits.name}-{info.backend}", backend=info.backend,
                               precision=_precision_label(bits, info), steps=student.steps, unet=eng,
                               model_bytes=size, scheduler_config=sched,
                               executed_on="cuda" if eng.device.type == "cuda" else "cpu",
                               extra={"int_weight_bytes": ib, "engine_dir": str(engine_dir)},
                               notes=list(info.notes)))
    if include_torch_student or not cands:
        from ..sampling import TorchUNet

        cands.append(Candidate(name=f"{bits.name}-pytorch-fakequant", backend="pytorch",
                               precision=f"{bits.name} fake-quant (fp32 kernels)", steps=student.steps,
                               unet=TorchUNet(student.unet), model_bytes=ib, scheduler_config=sched,
                               executed_on=device.type, extra={"int_weight_bytes": ib}))
    return cands


def _precision_label(bits: BitSpec, info) -> str:
    kern = "int8 kernels" if info.backend in ("onnxruntime", "tensorrt", "openvino") else info.backend
    grid = f"{bits.weight_bits}-bit weight grid" if bits.weight_bits != 8 else "int8 weights"
    act = f"int{bits.act_bits} activations" if bits.quantize_activations else "fp activations"
    return f"{bits.name} ({kern}, {grid}, {act})"


def _int_weight_bytes(q) -> int:
    """Deployable weight bytes with k-bit packing counted: quantized weights at k bits plus their fp32 scales and
    biases; every other parameter (norms, embeddings) at fp32."""
    total, prefixes = 0, []
    for name, m in q.quant_layers():
        prefixes.append(name + ".")
        total += (m.weight_int().numel() * m.weight_bits + 7) // 8 + 4 * m.weight_scale().numel()
        if m.bias is not None:
            total += 4 * m.bias.numel()
    for pname, p in q.unet.named_parameters():
        if not pname.startswith(tuple(prefixes)):
            total += 4 * p.numel()
    return total


def _summary(cfg: BuildConfig, run: RunDir, t_all: float) -> dict[str, Any]:
    rows = []
    for name, st in run.state["stages"].items():
        rows.append({"stage": name, "status": st.get("status"), "seconds": st.get("seconds"),
                     "path": str(run.path(name))})
    summary = {"run": str(run.root), "stages": rows, "seconds": round(time.time() - t_all, 1)}
    rep = run.path("report") / "compare.json"
    if rep.is_file():
        import json

        summary["compare"] = json.loads(rep.read_text())
    run.state["summary"] = {k: v for k, v in summary.items() if k != "compare"}
    run.save()
    return summary
