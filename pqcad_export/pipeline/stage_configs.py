"""The stage configs of one `build`, derived from its options in one place.

Why: `BuildConfig.validate()` builds them dry (a bad strategy, loss or override is refused before the first stage)
and the stages run with the very same objects, so the two can no longer drift. Each stage config is the one its
stage's own command builds (`CalibConfig`, `ReconConfig`, `CadConfig`, `CompareConfig`); their serialised forms
are the build's stage keys (docs/architecture.md, "Run directory").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..bits import BitSpec


@dataclass(frozen=True)
class StageConfigs:
    calib: Any      # calibration.CalibConfig
    quant: Any      # quantize.ReconConfig (progress follows --quiet; not part of the key)
    student: Any    # distill.CadConfig
    compare: Any    # pipeline.compare.CompareConfig


def quant_overrides(cfg) -> dict[str, Any]:
    """ReconConfig overrides of the quant stage: the `quant` group's typed options, then the overrides dict."""
    from ..quantize.plan import plan_overrides

    q = cfg.quant
    over = dict(q.overrides)
    if q.recon_loss != "block":
        over.setdefault("recon_loss", q.recon_loss)
    if q.qdrop is not None:
        over.setdefault("qdrop_prob", q.qdrop)
    for k, v in plan_overrides(q.mixed_precision, q.fp_budget, q.w8_budget).items():
        over.setdefault(k, v)  # the plan and its budgets enter the quant stage key via ReconConfig.key_dict()
    return over


def stage_configs(cfg, bits: BitSpec) -> StageConfigs:
    """The calibration, quantization, CAD and compare configs of `cfg` (a BuildConfig), validated."""
    from calibration.config import CalibConfig

    from ..distill.config import CadConfig
    from ..quantize import ReconConfig
    from .compare import CompareConfig

    qover = quant_overrides(cfg)
    c = cfg.calib
    pcr: dict[str, Any] = {}
    if c.strategy == "pcr":  # PCR quantizes between stages: same bits, method and settings as stage 2
        pcr = {"pcr_bits": bits, "pcr_method": cfg.quant.method, "pcr_preset": cfg.preset, "pcr_recon": qover}
    # typed options first, a stage's overrides win (one dict: a key in both is not passed twice)
    ccfg = CalibConfig.preset(cfg.preset, **{"steps": cfg.teacher_steps, "strategy": c.strategy, "seed": cfg.seed,
                                             **pcr, **c.overrides})
    # --quiet silences the per-block bars too (progress is not part of the stage key)
    rcfg = ReconConfig.preset(cfg.preset, **{**qover, **({"progress": False} if cfg.quiet else {})})
    d = cfg.distill
    dcfg = CadConfig.preset(cfg.preset, **{"calib_loss": d.calib_loss, "lam": d.lam, "kd_teacher": d.kd_teacher,
                                           "seed": cfg.seed, "teacher_steps": cfg.teacher_steps, **d.overrides})
    m = cfg.compare
    ccmp = CompareConfig.preset(cfg.preset, **{"seed": cfg.seed, "device": cfg.device, "samples": m.samples,
                                               "batch_size": m.batch_size, "latency_batch": m.latency_batch,
                                               "teacher_steps": cfg.teacher_steps, "no_fid": m.no_fid,
                                               "ref_images": m.ref_images, **m.overrides})
    return StageConfigs(ccfg, rcfg, dcfg, ccmp)
