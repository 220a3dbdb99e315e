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
from typing import Any, Optional

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


class UNetShapeMixin:
    """What callers ask of any held diffusers UNet (`self.unet`, `self.class_name`): conditional? sample shape?"""

    unet: torch.nn.Module
    class_name: str

    @property
    def is_conditional(self) -> bool:
        return self.class_name == "UNet2DConditionModel"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)


@dataclass
class LoadedModel(UNetShapeMixin):
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    path: Path
    fingerprint: str
    class_name: str
    cond: Optional[Any] = None  # conditioning.Conditioning of a run (conditional UNets only)


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


def check_finite(model: LoadedModel, cond: Optional[torch.Tensor] = None, batch: int = 2) -> None:
    """Refuse a model with non-finite weights, or whose forward pass on a small seeded probe batch (t = 999 and 0)
    gives NaN/inf, naming the first parameter / module at fault: before calibration, not after it."""
    from .errors import UsageError

    for name, p in list(model.unet.named_parameters()) + list(model.unet.named_buffers()):
        if p.is_floating_point() and not torch.isfinite(p).all():
            n_bad = int((~torch.isfinite(p)).sum())
            raise UsageError(f"model {model.path} has {n_bad} non-finite value(s) in {name}; it cannot be "
                             f"quantized")
    dev = next(model.unet.parameters()).device
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *model.sample_shape), generator=g).to(dev)
    t = torch.tensor([999, 0][:batch] + [500] * max(batch - 2, 0), device=dev)
    kwargs = {}
    if model.is_conditional:
        from .conditioning import cross_attention_dim

        c = cond if cond is not None else torch.randn((batch, 8, cross_attention_dim(model.unet)), generator=g)
        kwargs["encoder_hidden_states"] = c[:batch].to(dev)
    first: list[str] = []

    def hook(name):
        def fn(_m, _inp, out):
            o = out[0] if isinstance(out, (tuple, list)) else out
            if not first and torch.is_tensor(o) and o.is_floating_point() and not torch.isfinite(o).all():
                first.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.unet.named_modules()
               if n and not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            out = model.unet(x, t, **kwargs)
    except Exception as exc:  # a model that cannot run one forward pass is unusable input too
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"model {model.path} fails a probe forward pass: {msg[:200]}") from None
    finally:
        for h in handles:
            h.remove()
    out = out.sample if hasattr(out, "sample") else out
    if first or not torch.isfinite(out).all():
        where = f" (first at {first[0]})" if first else ""
        raise UsageError(f"model {model.path} gives NaN/inf on a probe batch{where}; it cannot be quantized")


def student_scheduler_config(scheduler_config: dict[str, Any], teacher_steps: int) -> dict[str, Any]:
    """The scheduler config whose (teacher_steps/2)-step DDIM grid is exactly every other point of the teacher's
    teacher_steps-step grid, set explicitly: unchanged for `trailing` spacing; for `leading` the offset moves by
    one teacher step (teacher 990, 980, ..., 0 -> student 990, 970, ..., 10). Raises UsageError, with the fix, when
    no such grid exists (uneven `linspace` grids, steps that do not divide num_train_timesteps)."""
    from .errors import UsageError
    from .sampling import ddim_timesteps

    n = int(scheduler_config.get("num_train_timesteps", 1000))
    spacing = scheduler_config.get("timestep_spacing", "leading")
    fix = ("set \"timestep_spacing\": \"trailing\" in the model's scheduler_config.json"
           if spacing not in ("leading", "trailing") else
           f"use a --teacher-steps that divides num_train_timesteps={n} (e.g. 100)")
    if teacher_steps < 2 or teacher_steps % 2:
        raise UsageError(f"--teacher-steps must be even and >= 2 to halve it, got {teacher_steps}")
    teacher = ddim_timesteps(scheduler_config, teacher_steps)
    diffs = set((teacher[:-1] - teacher[1:]).tolist())
    if n % teacher_steps or diffs != {n // teacher_steps}:
        raise UsageError(f"the {teacher_steps}-step DDIM grid of this scheduler (timestep_spacing={spacing!r}) is "
                         f"not evenly spaced, so CAD cannot halve it; {fix}")
    out = dict(scheduler_config)
    if spacing == "leading":
        out["steps_offset"] = int(scheduler_config.get("steps_offset", 0)) + n // teacher_steps
    if not torch.equal(ddim_timesteps(out, teacher_steps // 2), teacher[0::2]):
        raise UsageError(f"cannot place a {teacher_steps // 2}-step grid on every other point of the "
                         f"{teacher_steps}-step grid (timestep_spacing={spacing!r}); {fix}")
    return out
