"""`BuildConfig`: the options of one `build`, grouped by the stage they feed.

Run-wide options (bits, model, run directory, preset, step counts, backend, device, seed, resume) sit at the top;
each stage's options sit in its own typed group (`calib`, `quant`, `distill`, `compare`), each with an `overrides`
dict of further fields of that stage's config (iteration budgets, tests). `stage_configs.stage_configs()` turns
a BuildConfig into the four stage configs; their serialised forms are the stage keys, so the grouping does not
change the keys of existing run directories.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from ..bits import BitSpec, parse_bits
from ..errors import UsageError

# the `overrides` key of each group (run.json stage names; kept from the flat BuildConfig.overrides dict)
OVERRIDE_KEYS = {"calib": "calib", "quant": "quant", "student": "distill", "compare": "compare"}


@dataclass
class CalibOptions:
    """Stage 1, calibration (`calibrate`'s options)."""

    strategy: str = "uniform"                # C_QC selection: uniform | ndtc | tdac | pcr
    overrides: dict[str, Any] = field(default_factory=dict)   # more CalibConfig fields


@dataclass
class QuantOptions:
    """Stage 2, quantization (`quantize`'s options)."""

    method: str = "pq"                       # pq | direct | bitshrink | rtn
    recon_loss: str = "block"                # block | fbr (EDA-DM fine-grained block reconstruction)
    qdrop: Optional[float] = None            # QDrop probability in the LSQ phase (None = preset's)
    mixed_precision: str = "auto"            # auto (sensitivity plan, quantize/plan.py) | off
    fp_budget: Optional[float] = None        # max fraction of MACs with FP inputs (None = default)
    w8_budget: Optional[float] = None        # max fraction of weights kept at 8 bits (None = default)
    overrides: dict[str, Any] = field(default_factory=dict)   # more ReconConfig fields


@dataclass
class DistillOptions:
    """Stage 3, CAD (`distill`'s options)."""

    calib_loss: str = "em"
    lam: Optional[float] = None
    kd_teacher: Optional[str] = None         # CAD's KD target: None = the preset's (quantized, paper) | fp
    overrides: dict[str, Any] = field(default_factory=dict)   # more CadConfig fields


@dataclass
class CompareOptions:
    """Stage 6, the report (`compare`'s options)."""

    samples: Optional[int] = None            # images per model (None = preset)
    batch_size: Optional[int] = None         # sampling batch of the FID images (None = preset)
    latency_batch: Optional[int] = None
    include_torch_student: bool = False
    no_fid: bool = False
    relax_frac: Optional[float] = None       # + PCR activation-relaxing candidate (0.05-0.2 of steps)
    relax_where: str = "x0"                  # x0 (fidelity) | xT (structure): which end of the trajectory
    ref_images: Optional[str] = None         # data images for fid/kid (None: the shipped statistics)
    overrides: dict[str, Any] = field(default_factory=dict)   # more CompareConfig fields


# flat option name (BuildConfig.flat, older callers) -> (group, field)
_FLAT = {"calib_strategy": ("calib", "strategy"), "method": ("quant", "method"),
         "recon_loss": ("quant", "recon_loss"), "qdrop": ("quant", "qdrop"),
         "mixed_precision": ("quant", "mixed_precision"), "fp_budget": ("quant", "fp_budget"),
         "w8_budget": ("quant", "w8_budget"), "calib_loss": ("distill", "calib_loss"), "lam": ("distill", "lam"),
         "kd_teacher": ("distill", "kd_teacher"), "samples": ("compare", "samples"),
         "compare_batch": ("compare", "batch_size"), "latency_batch": ("compare", "latency_batch"),
         "include_torch_student": ("compare", "include_torch_student"), "no_fid": ("compare", "no_fid"),
         "relax_frac": ("compare", "relax_frac"), "relax_where": ("compare", "relax_where"),
         "ref_images": ("compare", "ref_images")}


@dataclass
class BuildConfig:
    bits: str = "w4a8"
    model: Optional[str] = None              # None = built-in teacher
    out: str = "runs/w4a8"
    preset: str = "quick"
    teacher_steps: int = 100
    student_steps: int = 50
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    resume: bool = True
    quiet: bool = False
    stop_after: Optional[str] = None         # run stages up to and including this one (debugging, tests)
    cond: Optional[str] = None               # conditional UNets: --cond FILE.safetensors (None = labelled default)
    calib: CalibOptions = field(default_factory=CalibOptions)
    quant: QuantOptions = field(default_factory=QuantOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)
    compare: CompareOptions = field(default_factory=CompareOptions)

    @classmethod
    def flat(cls, overrides: Optional[dict[str, dict[str, Any]]] = None, **kw: Any) -> "BuildConfig":
        """A BuildConfig from flat option names (`method=`, `calib_loss=`, `samples=`, ...) and a per-stage
        `overrides` dict keyed calib / quant / student / compare: the form scripts and JSON job specs use."""
        groups: dict[str, dict[str, Any]] = {"calib": {}, "quant": {}, "distill": {}, "compare": {}}
        for name, v in list(kw.items()):
            if name in _FLAT:
                g, f = _FLAT[name]
                groups[g][f] = kw.pop(name)
        for stage, over in (overrides or {}).items():
            if stage not in OVERRIDE_KEYS:
                raise UsageError(f"unknown stage '{stage}' in overrides: expected {', '.join(OVERRIDE_KEYS)}")
            groups[OVERRIDE_KEYS[stage]]["overrides"] = dict(over)
        top = {f.name for f in fields(cls)} - set(groups)
        bad = [k for k in kw if k not in top]
        if bad:
            raise UsageError(f"unknown build option(s): {', '.join(bad)}")
        return cls(**kw, calib=CalibOptions(**groups["calib"]), quant=QuantOptions(**groups["quant"]),
                   distill=DistillOptions(**groups["distill"]), compare=CompareOptions(**groups["compare"]))

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The per-stage overrides, keyed as run stages (calib / quant / student / compare); empty ones left out."""
        return {stage: dict(getattr(self, g).overrides) for stage, g in OVERRIDE_KEYS.items()
                if getattr(self, g).overrides}

    def validate(self) -> BitSpec:
        """Every option, before anything is loaded or written (one UsageError line each)."""
        from .. import checks
        from engines import BACKENDS

        bits = parse_bits(self.bits)
        m, q = self.compare, self.quant
        for flag, v in (("--samples", m.samples), ("--latency-batch", m.latency_batch),
                        ("compare batch", m.batch_size), ("--teacher-steps", self.teacher_steps)):
            checks.positive(flag, v)
        checks.positive("--seed", self.seed, allow_zero=True)
        checks.positive("--lambda", self.distill.lam, allow_zero=True)
        checks.in_range("--qdrop", q.qdrop, 0.0, 1.0)
        for stage_name, over in self.overrides().items():
            for k, v in over.items():
                if k.endswith("iters") and isinstance(v, (int, float)):
                    checks.positive(f"{stage_name} {k}", v, allow_zero=True)
        checks.writable_dir(self.out)
        checks.device(self.device)
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown backend '{self.backend}': expected one of {', '.join(BACKENDS)}")
        if q.method not in ("pq", "direct", "bitshrink", "rtn"):
            raise UsageError(f"unknown method '{q.method}': expected pq, direct, bitshrink or rtn")
        from ..quantize.plan import plan_overrides

        plan_overrides(q.mixed_precision, q.fp_budget, q.w8_budget)
        if self.student_steps * 2 != self.teacher_steps:
            raise UsageError(f"CAD halves the steps: --student-steps must be --teacher-steps / 2 "
                             f"({self.teacher_steps} / 2), got {self.student_steps}")
        if self.preset not in ("quick", "paper"):
            raise UsageError(f"unknown preset '{self.preset}': expected quick or paper")
        if m.relax_frac is not None:
            from .relax import check_relax

            check_relax(m.relax_frac, m.relax_where)
        from .preflight import dry_stage_configs

        dry_stage_configs(self, bits)
        return bits


def budget_overrides(quant_iters: Optional[int] = None, act_iters: Optional[int] = None,
                     distill_iters: Optional[int] = None) -> dict[str, dict[str, Any]]:
    """Per-stage overrides (BuildConfig.flat's `overrides`) for an iteration budget (the preset's algorithm, fewer
    iterations); None keeps the preset's value."""
    for flag, v in (("--quant-iters", quant_iters), ("--act-iters", act_iters), ("--distill-iters", distill_iters)):
        if v is not None and v < 0:
            raise UsageError(f"{flag} must be >= 0, got {v}")
    quant = {k: v for k, v in (("iters", quant_iters), ("act_iters", act_iters)) if v is not None}
    student = {"iters": distill_iters} if distill_iters is not None else {}
    return {k: v for k, v in (("quant", quant), ("student", student)) if v}
