"""Saved quantized UNet: `quantized.safetensors` (int8 weight grids, per-channel steps, activation steps, the
unquantized parameters) + `quant.json` (bits, steps, method, scheduler/unet config, source fingerprint, per-layer
quantization spec) + `quant_log.json` (reconstruction / PQ log). Reloading gives bit-identical outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from ..bits import parse_bits
from ..errors import PqcadError
from .model import QuantizedModel
from .checkpoints import atomic_save_tensors, atomic_write_json
from .wrap import freeze_all, layer_specs, rebuild_from_specs

FORMAT = "pqcad-quantized-unet"
VERSION = 1
WEIGHTS = "quantized.safetensors"
META = "quant.json"
LOG = "quant_log.json"
SENSITIVITY = "sensitivity.json"


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_quantized(model: QuantizedModel, out_dir: str | Path, meta: Optional[dict[str, Any]] = None) -> Path:
    """Write the model atomically (weights first, quant.json last: a directory with quant.json is complete)."""
    out = Path(out_dir)
    freeze_all(model.unet)
    state = model.unet.state_dict()
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise PqcadError(f"refusing to save: non-finite values in {k}")
    full = dict(model.meta)
    full.update(meta or {})
    full["bits"] = model.bits.name
    full["method"] = model.method
    full["layers"] = layer_specs(model.unet)
    full.setdefault("steps", 100)
    if "scheduler_config" not in full or "unet_config" not in full:
        raise PqcadError("quantized model metadata lacks scheduler_config / unet_config")
    out.mkdir(parents=True, exist_ok=True)
    if (out / META).exists():
        (out / META).unlink()  # mark incomplete while rewriting
    atomic_save_tensors(out / WEIGHTS, state, metadata={"format": FORMAT, "version": str(VERSION)})
    full.update({"format": FORMAT, "version": VERSION, "fingerprint": _file_hash(out / WEIGHTS)})
    atomic_write_json(out / LOG, model.log or {})
    if model.sensitivity:  # mixed precision auto: the measurement the plan was chosen from
        from .sensitivity import plot_sensitivity

        atomic_write_json(out / SENSITIVITY, model.sensitivity)
        plot_sensitivity(model.sensitivity, out / "sensitivity.png")
    atomic_write_json(out / META, full)
    model.meta = full
    return out


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> QuantizedModel:
    """Rebuild the wrapped diffusers UNet from quant.json and load its tensors strictly."""
    p = Path(path)
    if not (p / META).is_file():
        raise PqcadError(f"not a quantized model directory (no {META}): {p}")
    try:
        meta = json.loads((p / META).read_text())
    except json.JSONDecodeError as exc:
        raise PqcadError(f"corrupt {p / META}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise PqcadError(f"{p / META} is not a {FORMAT} file")
    if not (p / WEIGHTS).is_file():
        raise PqcadError(f"missing {p / WEIGHTS}")
    import diffusers
    from safetensors.torch import load_file

    cls = getattr(diffusers, meta.get("class_name", ""), None)
    if cls is None:
        raise PqcadError(f"unknown UNet class {meta.get('class_name')!r} in {p / META}")
    cfg = {k: v for k, v in meta["unet_config"].items() if not k.startswith("_")}
    unet = cls.from_config(cfg).float().eval()
    rebuild_from_specs(unet, meta["layers"])
    try:
        state = load_file(str(p / WEIGHTS))
        unet.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors / torch raise several types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PqcadError(f"could not load {p / WEIGHTS}: {msg}") from None
    unet.requires_grad_(False)
    unet.to(device)
    log = json.loads((p / LOG).read_text()) if (p / LOG).is_file() else {}
    return QuantizedModel(unet=unet, bits=parse_bits(meta["bits"]), method=meta.get("method", "direct"),
                          meta=meta, log=log)
