"""CAD training images: a dataset's first n, or data-free DDIM samples of the FP model (cached per run dir)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import PqcadError
from ..sampling import TorchUNet
from .config import CadConfig
from .files import FP_GIVEN, TRAIN_IMAGES, _digest


def images_from_dataset(path: str, n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """First n images of a dataset as float [-1, 1] NCHW (pqcad_export.data.load_images)."""
    from ..data import load_images

    arr = load_images(path, size=shape[1], channels=shape[0])[:n]
    return torch.from_numpy(arr.copy()).float() / 127.5 - 1.0


def images_from_model(unet_fn: Callable, scheduler_config: dict[str, Any], shape: tuple[int, int, int], n: int,
                      steps: int, seed: int, device: Union[str, torch.device], quiet: bool = True,
                      cond=None) -> torch.Tensor:
    """Data-free training images: n samples of a model with the DDIM sampler (seeded); image i is drawn with
    conditioning row i (mod N) of `cond`, the row CAD pairs it with."""
    from ..progress import Progress
    from ..sampling import SamplerConfig, ddim_sample

    with Progress(n, f"CAD: sampling {n} training images ({steps} steps)", not quiet) as bar:
        return ddim_sample(unet_fn, scheduler_config, shape, n, SamplerConfig(steps=steps, batch_size=min(n, 32),
                                                                              seed=seed),
                           device=device, progress=bar.advance, cond=None if cond is None else cond.rows(n))


def _fp_model_for(quantized, fp_model, device) -> tuple[Optional[nn.Module], str]:
    """The FP model that draws data-free training images: given, or the built-in teacher when the quantized model
    was made from it (same fingerprint); None otherwise."""
    from ..model_io import DEFAULT_MODEL_DIR, fingerprint_dir, load_model

    if isinstance(fp_model, nn.Module):
        return fp_model, FP_GIVEN
    if fp_model is not None and not isinstance(fp_model, (str, Path)):  # a LoadedModel
        return fp_model.unet, f"fp model {getattr(fp_model, 'path', '')}"
    if fp_model is not None:
        lm = load_model(fp_model, device)
        src = quantized.meta.get("source_fingerprint")
        if src and lm.fingerprint != src:
            raise PqcadError(f"--model {fp_model} (fingerprint {lm.fingerprint}) is not the model the quantized "
                             f"teacher was made from ({src})")
        return lm.unet, f"fp model {lm.path}"
    src = quantized.meta.get("source_fingerprint")
    if src and DEFAULT_MODEL_DIR.is_dir() and fingerprint_dir(DEFAULT_MODEL_DIR) == src:
        return load_model(None, device).unet, "fp model (built-in teacher)"
    return None, ""


def training_images(quantized, cfg: CadConfig, out_dir: Path, device, fp: Optional[nn.Module] = None,
                    fp_desc: str = "", quiet: bool = True, cond=None) -> tuple[torch.Tensor, str]:
    """Training images for CAD, cached in out_dir (so a resumed run sees the same ones). `quantized` gives the shape
    and schedule (any model with `sample_shape` and `scheduler_config`, e.g. a LoadedModel, when `fp` is given); it
    draws the images itself only when no FP model and no dataset is known.

    dataset path -> its first n images; otherwise data-free: n samples of the FP model (teacher_steps DDIM steps)
    or, when no FP model is known, of the quantized teacher itself. FP samples do not depend on the quantized
    teacher, so their cache key leaves it out: students of different teachers of one FP model can share the file."""
    from safetensors.torch import load_file, save_file

    shape = quantized.sample_shape
    key = _digest({"dataset": cfg.dataset, "n": cfg.n_train_images, "seed": cfg.seed, "steps": cfg.teacher_steps,
                   "teacher": None if (cfg.dataset or fp is not None) else quantized.meta.get("fingerprint"),
                   "fp": fp_desc, **({"cond": cond.fingerprint} if cond is not None and not cfg.dataset else {})})
    cache = out_dir / TRAIN_IMAGES
    if cache.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), "pt") as fh:
                md = fh.metadata() or {}
            if md.get("key") == key:
                return load_file(str(cache))["images"], md.get("source", "cache")
        except Exception:  # a stale or damaged cache is simply rebuilt
            pass
    if cfg.dataset:
        imgs, source = images_from_dataset(cfg.dataset, cfg.n_train_images, shape), f"dataset {cfg.dataset}"
    else:
        source = fp_desc
        if fp is None:
            fn, source = quantized, "quantized teacher samples (no FP model known; pass --model for FP samples)"
        else:
            fn = TorchUNet(fp.to(device).eval())
        imgs = images_from_model(fn, quantized.scheduler_config, shape, cfg.n_train_images, cfg.teacher_steps,
                                 cfg.seed + 4242, device, quiet, cond)
        source = f"data-free: {cfg.n_train_images} DDIM-{cfg.teacher_steps} samples of the {source}"
    atomic_write(cache, lambda tmp: save_file({"images": imgs.contiguous()}, tmp,
                                               metadata={"key": key, "source": source}))
    return imgs, source
