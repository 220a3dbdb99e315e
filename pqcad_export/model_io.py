"""Loading diffusers UNets (with their DDIM schedule) from local directories in diffusers layout.

Two layouts are accepted, as on the Hugging Face hub:
  * model repo:    DIR/config.json (+ weights) and optionally DIR/scheduler_config.json  (google/ddpm-cifar10-32)
  * pipeline repo: DIR/unet/config.json (+ weights) and DIR/scheduler/scheduler_config.json
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import PqcadError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_teacher"
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# Used when a model directory carries no scheduler config: the DDPM linear schedule of google/ddpm-cifar10-32.
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}


@dataclass
class LoadedModel:
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    path: Path
    fingerprint: str
    class_name: str

    @property
    def is_conditional(self) -> bool:
        return self.class_name == "UNet2DConditionModel"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)


def _unet_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    raise PqcadError(f"not a diffusers UNet directory: {path} (no config.json or unet/config.json)")


def _scheduler_config(path: Path, unet_dir: Path) -> dict[str, Any]:
    for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                 unet_dir / "scheduler_config.json"):
        if cand.is_file():
            cfg = json.loads(cand.read_text())
            merged = dict(DEFAULT_SCHEDULER_CONFIG)
            merged.update({k: v for k, v in cfg.items() if not k.startswith("_")})
            merged["_class_name"] = "DDIMScheduler"
            return merged
    return dict(DEFAULT_SCHEDULER_CONFIG)


def fingerprint_dir(unet_dir: Path) -> str:
    """Content hash of the UNet config and weights: identifies 'the same model' across runs."""
    h = hashlib.sha256()
    for name in ("config.json", *WEIGHT_FILES):
        f = unet_dir / name
        if f.is_file():
            h.update(name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def resolve_model_dir(model: str | Path | None) -> Path:
    return DEFAULT_MODEL_DIR if model in (None, "") else Path(model).expanduser()


def load_model(model: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a diffusers UNet2DModel / UNet2DConditionModel and its scheduler config (one-line errors)."""
    path = resolve_model_dir(model)
    if not path.exists():
        raise PqcadError(f"model directory does not exist: {path}")
    if not path.is_dir():
        raise PqcadError(f"model path is not a directory: {path}")
    unet_dir = _unet_dir(path)
    try:
        cfg = json.loads((unet_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PqcadError(f"unreadable UNet config {unet_dir / 'config.json'}: {exc}") from None
    cls_name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if cls_name not in UNET_CLASSES:
        raise PqcadError(f"not a diffusers UNet: {unet_dir / 'config.json'} has _class_name={cls_name!r}, "
                         f"expected one of {', '.join(UNET_CLASSES)}")
    if not any((unet_dir / w).is_file() for w in WEIGHT_FILES):
        raise PqcadError(f"no UNet weights in {unet_dir} (expected {' or '.join(WEIGHT_FILES)})")
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its accelerate / dtype hints are noise for our users
    cls = getattr(diffusers, cls_name)
    try:
        unet = cls.from_pretrained(str(unet_dir), local_files_only=True)
    except Exception as exc:  # diffusers raises many types for corrupt weights
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PqcadError(f"could not load UNet from {unet_dir}: {msg}") from None
    unet = unet.to(device=device, dtype=torch.float32).eval()
    unet.requires_grad_(False)
    return LoadedModel(unet=unet, scheduler_config=_scheduler_config(path, unet_dir), path=path,
                       fingerprint=fingerprint_dir(unet_dir), class_name=cls_name)


def save_model(unet: torch.nn.Module, scheduler_config: dict[str, Any], out: str | Path) -> Path:
    """Write a UNet in the model-repo layout (config.json, safetensors, scheduler_config.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out), safe_serialization=True)
    sched = {k: v for k, v in scheduler_config.items()}
    sched["_class_name"] = "DDIMScheduler"
    (out / "scheduler_config.json").write_text(json.dumps(sched, indent=2, sort_keys=True))
    return out
