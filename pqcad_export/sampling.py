"""DDIM sampling behind one UNet interface, so PyTorch models, ONNX Runtime sessions and TensorRT engines
produce images through exactly the same loop (same noise, same schedule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch
from diffusers import DDIMScheduler


class UNetFn(Protocol):
    """eps = unet(sample[B,C,H,W] float32, timestep[B] int64, encoder_hidden_states or None)."""

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class TorchUNet:
    """Adapter: a diffusers UNet (FP or quantized wrapper) as a UNetFn returning the noise prediction.

    `cond` (a conditioning.Conditioning) fills encoder_hidden_states for calls without one (rows 0..B-1), so a
    conditional UNet runs in loops written for unconditional ones (latency, FID sampling)."""

    def __init__(self, unet: torch.nn.Module, cond: Optional[Any] = None):
        self.unet = unet
        self.cond = cond
        self.conditional = _takes_cond(unet)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def __call__(self, sample, timestep, encoder_hidden_states=None):
        if encoder_hidden_states is None and self.conditional:
            encoder_hidden_states = _default_rows(self.cond, sample)
        if encoder_hidden_states is not None or self.conditional:
            out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)
        else:
            out = self.unet(sample, timestep)
        return out.sample if hasattr(out, "sample") else out


def _takes_cond(unet: torch.nn.Module) -> bool:
    """Whether forward takes encoder_hidden_states (through decorators such as diffusers' peft wrapper, which
    hide it from forward.__code__)."""
    import inspect

    if type(unet).__name__ == "UNet2DModel":
        return False
    try:
        return "encoder_hidden_states" in inspect.signature(unet.forward).parameters
    except (TypeError, ValueError):
        return "encoder_hidden_states" in unet.forward.__code__.co_varnames


def _default_rows(cond: Optional[Any], sample: torch.Tensor) -> torch.Tensor:
    from .errors import PqcadError

    if cond is None:
        raise PqcadError("a conditional UNet needs conditioning (encoder_hidden_states); none was given")
    return cond.rows(sample.shape[0]).to(sample.device)


class WithCond:
    """Any UNetFn (an engine) with default conditioning rows for calls that pass none (see TorchUNet)."""

    def __init__(self, fn: Any, cond: Any):
        self.fn, self.cond = fn, cond

    def __getattr__(self, name: str) -> Any:  # device, info, sample_shape... of the wrapped engine
        if name in ("fn", "cond"):
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, sample, timestep, encoder_hidden_states=None):
        if encoder_hidden_states is None:
            encoder_hidden_states = _default_rows(self.cond, sample)
        return self.fn(sample, timestep, encoder_hidden_states)


def with_cond(fn: Any, cond: Optional[Any]) -> Any:
    return fn if cond is None else WithCond(fn, cond)


def make_scheduler(scheduler_config: dict[str, Any], steps: int) -> DDIMScheduler:
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(steps)
    return sched


def ddim_timesteps(scheduler_config: dict[str, Any], steps: int) -> torch.Tensor:
    """The DDIM timestep grid (descending) used for `steps` sampling steps."""
    return make_scheduler(scheduler_config, steps).timesteps.clone()


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x_T for samples 0..n-1: identical for every model and batch size, so FID-to-FP32 pairs images."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=g)


@dataclass
class SamplerConfig:
    steps: int = 100
    eta: float = 0.0
    batch_size: int = 64
    seed: int = 0


StepHook = Callable[[int, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


@torch.no_grad()
def ddim_sample(unet: UNetFn, scheduler_config: dict[str, Any], shape: tuple[int, int, int], n: int,
                cfg: SamplerConfig = SamplerConfig(), device: str | torch.device = "cpu",
                cond: Optional[torch.Tensor] = None, on_step: Optional[StepHook] = None,
                noise: Optional[torch.Tensor] = None, progress: Optional[Callable[[int], None]] = None
                ) -> torch.Tensor:
    """Generate n images in [-1, 1] (CPU float tensor).

    on_step(step_index, t, x_t, cond) sees every UNet input before the call (calibration collectors use it).
    progress(k) is called after each batch with the number of images finished in it.
    """
    device = torch.device(device)
    x_all = initial_noise(n, shape, cfg.seed) if noise is None else noise
    out = []
    for b0 in range(0, n, cfg.batch_size):
        sched = make_scheduler(scheduler_config, cfg.steps)
        x = x_all[b0:b0 + cfg.batch_size].to(device)
        c = None if cond is None else cond[b0:b0 + x.shape[0]].to(device)  # (cond may hold more rows than n)
        # Step noise for eta > 0: seeded per batch so a run is reproducible for a given batch size.
        gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed) * 1_000_003 + b0)
        for i, t in enumerate(sched.timesteps):
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=device)
            if on_step is not None:
                on_step(i, tt, x, c)
            eps = unet(x, tt, c).to(x.dtype)
            if cfg.eta > 0:
                vn = torch.randn(x.shape, generator=gen).to(device)
                x = sched.step(eps, t, x, eta=cfg.eta, variance_noise=vn).prev_sample
            else:
                x = sched.step(eps, t, x, eta=0.0).prev_sample
        out.append(x.float().cpu())
        if progress is not None:
            progress(x.shape[0])
    return torch.cat(out).clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1,1] float NCHW -> uint8 NCHW, rounding as diffusers' pipelines do."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
