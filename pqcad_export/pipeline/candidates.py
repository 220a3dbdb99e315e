"""A run directory's engine (and optionally its PyTorch fake-quant student) as `compare` candidates, with the
labels the report shows: what precision runs where and the deployable weight bytes."""

from __future__ import annotations

from pathlib import Path

import torch

from ..bits import BitSpec, packed_bytes
from ..errors import PqcadError
from ..model_io import LoadedModel
from .compare import Candidate


def run_candidates(root: Path, teacher: LoadedModel, bits: BitSpec, include_torch_student: bool,
                   device: torch.device, cond=None) -> list[Candidate]:
    """The engine of a run directory (and optionally its PyTorch fake-quant student) as compare candidates;
    `cond` (conditional UNets) fills their encoder_hidden_states as it does the teacher's."""
    from ..sampling import with_cond

    from engines import EngineError, engine_bytes, load_engine
    from engines.manifest import read_manifest

    from ..quantize import load_quantized

    student_dir, engine_dir = root / "student", root / "engine"
    if not (student_dir / "quant.json").is_file():
        raise PqcadError(f"{root} has no finished student (student/quant.json); run build first")
    student = load_quantized(student_dir, device)
    sched = student.scheduler_config
    ib = _int_weight_bytes(student)
    from .compare import precision_summary

    ps = precision_summary(student.meta)
    cands = []
    if (engine_dir / "engine.json").is_file():
        info = read_manifest(engine_dir)
        from .compare import check_engine_model

        fp_notes = check_engine_model(info, teacher, engine_dir)
        try:
            eng = load_engine(engine_dir)
        except EngineError as exc:
            raise PqcadError(str(exc)) from None
        notes = list(info.notes) + fp_notes
        size = engine_bytes(engine_dir)
        cands.append(Candidate(name=f"{bits.name}-{info.backend}", backend=info.backend,
                               precision=_precision_label(bits, info), steps=student.steps,
                               unet=with_cond(eng, cond), model_bytes=size, scheduler_config=sched,
                               executed_on="cuda" if eng.device.type == "cuda" else "cpu",
                               extra={"int_weight_bytes": ib, "engine_dir": str(engine_dir), **ps},
                               notes=notes))
    if include_torch_student or not cands:
        from ..sampling import TorchUNet

        cands.append(Candidate(name=f"{bits.name}-pytorch-fakequant", backend="pytorch",
                               precision=f"{bits.name} fake-quant (fp32 kernels)", steps=student.steps,
                               unet=TorchUNet(student.unet, cond), model_bytes=ib, scheduler_config=sched,
                               executed_on=device.type, extra={"int_weight_bytes": ib, **ps}))
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
        total += packed_bytes(m.weight_int().numel(), m.weight_bits) + 4 * m.weight_scale().numel()
        if m.bias is not None:
            total += 4 * m.bias.numel()
    for pname, p in q.unet.named_parameters():
        if not pname.startswith(tuple(prefixes)):
            total += 4 * p.numel()
    return total
