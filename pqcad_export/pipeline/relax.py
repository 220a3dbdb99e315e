"""PCR activation relaxing (Tang et al., arXiv 2311.06322, Sec. 3.3) as an extra `compare` candidate of a build.

The relaxed engine is the same distilled student exported without activation QDQ (weights keep their learned
integers and scales as DequantizeLinear initializers; activations FP32) and built with the run's backend
(ONNX Runtime: the graph as exported, mode "qdq"). `engines.relax.RelaxedUNet` sends the chosen fraction of the
sampling steps (nearest x_0 or x_T) to it and every other step to the run's INT8 engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bits import BitSpec
from ..errors import PqcadError, UsageError
from .compare import Candidate

RELAX_ONNX = Path("export") / "unet_relaxed.onnx"
RELAX_ENGINE = "engine_relaxed"
RELAXED_ACT_BITS = 32  # the relaxed engine computes activations in FP32


def check_relax(frac: float, where: str) -> None:
    """One-line UsageError for a bad --relax-frac / --relax-where."""
    from engines.relax import RELAX_FRAC_RANGE, RELAX_WHERE

    lo, hi = RELAX_FRAC_RANGE
    if not lo <= float(frac) <= hi:
        raise UsageError(f"--relax-frac must be in [{lo}, {hi}] (PCR relaxes a small share of steps), got {frac}")
    if where not in RELAX_WHERE:
        raise UsageError(f"--relax-where must be x0 (fidelity) or xT (structure), got {where!r}")


def build_relaxed_engine(root: str | Path, backend: str = "auto") -> dict[str, Any]:
    """Export root/student without activation QDQ to root/export/unet_relaxed.onnx and build root/engine_relaxed."""
    from ..quantize import load_quantized

    root = Path(root)
    return relaxed_engine(load_quantized(root / "student"), root / RELAX_ONNX, root / RELAX_ENGINE, backend)


def relaxed_engine(q, onnx_path: Path, engine_dir: Path, backend: str = "auto") -> dict[str, Any]:
    """A copy of the quantized model `q` exported without activation QDQ and built (ORT: the graph as exported)."""
    import copy

    from engines import EngineError, build_engine
    from engines.onnxruntime import OrtConfig

    from ..export.onnx import export_unet
    from ..quantize.wrap import set_act_quant

    unet = copy.deepcopy(q.unet)
    set_act_quant(unet, False)
    res = export_unet(unet, onnx_path, meta={"bits": f"w{q.bits.weight_bits}a{RELAXED_ACT_BITS}", "steps": q.steps,
                                             "relaxed": "activation relaxing: no activation QDQ"})
    if res.n_act_qdq:
        raise PqcadError(f"relaxed export still has {res.n_act_qdq} activation QDQ pairs")
    try:
        info = build_engine(onnx_path, engine_dir, backend, ort_config=OrtConfig(mode="qdq"))
    except EngineError as exc:
        raise PqcadError(f"relaxed engine: {exc}") from None
    return {"onnx": str(onnx_path), "backend": info.backend, "activation_qdq": res.n_act_qdq}


def relax_candidate(root: str | Path, main: Candidate, bits: BitSpec, frac: float, where: str) -> Candidate:
    """`main` (the run's INT8 engine candidate) with round(frac * steps) steps at the `where` end relaxed."""
    from engines import EngineError, engine_bytes, load_engine
    from engines.relax import RelaxedUNet, relaxed_timesteps

    from ..sampling import ddim_timesteps

    check_relax(frac, where)
    root = Path(root)
    edir = root / RELAX_ENGINE
    try:
        eng = load_engine(edir)
    except EngineError as exc:
        raise PqcadError(str(exc)) from None
    grid = [int(t) for t in ddim_timesteps(main.scheduler_config, main.steps)]
    relax = relaxed_timesteps(grid, frac, where)
    fn = RelaxedUNet(main.unet, eng, relax, bits.act_bits, RELAXED_ACT_BITS)
    avg = fn.average_act_bits(main.steps)
    size = engine_bytes(edir)
    side = "x_0 (fidelity)" if where == "x0" else "x_T (structure)"
    return Candidate(
        name=f"{main.name}-relax-{where}-{frac:g}", backend=main.backend,
        precision=f"{main.precision}; fp32 activations on {len(relax)}/{main.steps} steps nearest {side}",
        steps=main.steps, unet=fn, model_bytes=(main.model_bytes or 0) + size, scheduler_config=main.scheduler_config,
        executed_on=main.executed_on,
        extra={"average_act_bits": round(avg, 4),
               "relax": {"fraction": frac, "where": where, "relaxed_timesteps": relax, "steps": main.steps,
                         "main_act_bits": bits.act_bits, "relaxed_act_bits": RELAXED_ACT_BITS,
                         "relaxed_engine": str(edir), "relaxed_backend": eng.info.backend},
               "engine_calls": fn.stats},
        notes=[f"activation relaxing (PCR): {len(relax)} of {main.steps} steps on the relaxed engine "
               f"({eng.info.backend}, no activation QDQ), the rest on the INT8 engine",
               "model_bytes counts both engines; engine_calls count every call made during compare (latency "
               "probes at t=500, timed runs, FID sampling); unet_ms_per_call is measured at t=500 (on the engine "
               "that timestep maps to), ms_per_image times full sampling runs, i.e. the real mix"])
