"""Checkpoints of a reconstruction run: atomic writes, one unit's state, the progress document, cached sensitivity.

A run with the same resume key (`progress.json`'s "key") reuses the finished units' states and ends bit-identical
to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..atomic import atomic_write_bytes
from ..atomic import atomic_write_json as _atomic_write_json
from ..bits import BitSpec
from .blocks import Unit
from .capture import calibration_hash
from .config import ReconConfig


def atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_json(path, obj, indent=1)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def unit_state(model: nn.Module, unit: Unit) -> dict[str, torch.Tensor]:
    out = {}
    for m in unit.members:
        for k, v in model.get_submodule(m).state_dict().items():
            out[f"{m}.{k}"] = v
    return out


def load_unit_state(model: nn.Module, unit: Unit, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(next(iter(model.buffers())).device))
    for _, layer in unit.quant_layers(model):
        if not layer.wq.frozen:
            layer.prepare_frozen(tuple(layer.w_fp.shape))
    for m in unit.members:
        sub = {k[len(m) + 1:]: v for k, v in state.items() if k.startswith(m + ".")}
        model.get_submodule(m).load_state_dict(sub, strict=True)



def resume_key(key: dict[str, Any]) -> str:
    """The short hash that progress.json stores."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def open_progress(ckpt: Optional[Path], key_hash: str) -> dict[str, Any]:
    """The progress document of `ckpt` when its key matches, else a fresh one (written at once)."""
    progress_doc: dict[str, Any] = {"key": key_hash, "done": [], "log": []}
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        pf = ckpt / "progress.json"
        if pf.is_file():
            try:
                old = json.loads(pf.read_text())
            except json.JSONDecodeError:
                old = {}
            if old.get("key") == key_hash:
                progress_doc = old
        atomic_write_json(pf, progress_doc)
    return progress_doc


def cached_sensitivity(fp, calib, bits: BitSpec, cfg: ReconConfig, model_fp: str, checkpoint_dir) -> dict[str, Any]:
    """measure_sensitivity, reused from the checkpoint directory when model, data and bits are unchanged."""
    from .sensitivity import measure_sensitivity

    key = hashlib.sha256(json.dumps([model_fp, calibration_hash(calib), bits.name, cfg.first_last_bits,
                                     cfg.io_act_quant]).encode()).hexdigest()[:16]
    f = Path(checkpoint_dir) / "sensitivity.json" if checkpoint_dir else None
    if f is not None and f.is_file():
        try:
            doc = json.loads(f.read_text())
            if doc.get("key") == key:
                return doc
        except json.JSONDecodeError:
            pass
    doc = measure_sensitivity(fp, calib, bits, cfg.first_last_bits, cfg.io_act_quant)
    doc["key"] = key
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(f, doc)
    return doc

