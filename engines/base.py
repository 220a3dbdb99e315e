"""The engine interface: one object per built engine that the DDIM sampler can call like a PyTorch UNet.

An Engine is a `pqcad_export.sampling.UNetFn`: eps = engine(sample[B,C,H,W] f32, timestep[B] int64, cond|None),
so sampling, FID and latency use exactly the same loop for PyTorch, ONNX Runtime and TensorRT.
"""

from __future__ import annotations

import functools
import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .manifest import EngineInfo

if TYPE_CHECKING:  # torch is imported where it runs: the bench worker process times engines without it
    import torch


@dataclass
class LatencyStats:
    """Per-UNet-call latency: median of >= `iters` timed runs after `warmup` untimed runs."""

    batch: int
    iters: int
    warmup: int
    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    p90_ms: float
    timer: str = "perf_counter"
    samples_ms: list[float] = field(default_factory=list)

    @property
    def ms_per_sample(self) -> float:
        return self.median_ms / self.batch

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ms_per_sample"] = self.ms_per_sample
        return d


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset]:
    """Model name and flags of the first processor in Linux /proc/cpuinfo ("" and no flags where unreadable): the
    flags decide which INT8 kernels ONNX Runtime can use, so engines and reports both read them."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return "", frozenset()
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first if ":" in line)}
    return info.get("model name", ""), frozenset(info.get("flags", "").split())


ISA_LABELS = (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
              ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_isa() -> str:
    """The widest integer dot-product ISA of this CPU ("AVX-512 VNNI", ...; "" where unknown), plus "+BF16" where
    AVX-512 BF16 exists: together they decide how far INT8 kernels can beat the float ones."""
    flags = cpu_info()[1]
    isa = next((label for flag, label in ISA_LABELS if flag in flags), "")
    return f"{isa}+BF16" if isa and "avx512_bf16" in flags else isa


def summarize_ms(samples: list[float], batch: int, warmup: int, timer: str) -> LatencyStats:
    s = sorted(samples)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return LatencyStats(batch=batch, iters=len(s), warmup=warmup, median_ms=statistics.median(s),
                        mean_ms=statistics.fmean(s), min_ms=s[0], max_ms=s[-1], p90_ms=p90, timer=timer,
                        samples_ms=[round(x, 4) for x in samples])


def time_cpu(fn: Callable[[], object], batch: int, warmup: int = 3, iters: int = 10) -> LatencyStats:
    """Wall-clock timing of a synchronous call (CPU backends)."""
    if iters < 1:
        raise ValueError("iters must be >= 1")
    for _ in range(max(0, warmup)):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return summarize_ms(out, batch, warmup, "perf_counter")


def time_cuda(fn: Callable[[], object], batch: int, warmup: int = 10, iters: int = 50,
              stream: Optional[torch.cuda.Stream] = None) -> LatencyStats:
    """CUDA-event timing of an asynchronous GPU call on `stream` (TensorRT, torch CUDA)."""
    import torch

    stream = stream or torch.cuda.current_stream()
    for _ in range(max(0, warmup)):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        out.append(a.elapsed_time(b))
    return summarize_ms(out, batch, warmup, "cuda_event")


class Engine(ABC):
    """A loaded, runnable engine. Subclasses implement `_run` on backend-native inputs."""

    info: EngineInfo

    @classmethod
    def _built(cls, build: Callable[..., object], onnx_path: str | Path, cfg, out_dir: Optional[str | Path],
               prefix: str):
        """Build an engine directory from ONNX with `build` (in a fresh temporary directory unless `out_dir`) and
        load it: what every backend's `from_onnx` does."""
        import tempfile

        out_dir = out_dir or tempfile.mkdtemp(prefix=prefix)
        build(onnx_path, out_dir, cfg)
        return cls(out_dir)

    @property
    def backend(self) -> str:
        return self.info.backend

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device("cpu")

    @property
    def sample_shape(self) -> Optional[tuple[int, int, int]]:
        s = self.info.sample_shape
        return tuple(s) if s else None  # type: ignore[return-value]

    @property
    def conditional(self) -> bool:
        return "encoder_hidden_states" in self.info.input_names

    @abstractmethod
    def run(self, sample: torch.Tensor, timestep: torch.Tensor,
            encoder_hidden_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """eps for one batch (returned on the same device as `sample`)."""

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        if timestep.dim() == 0:
            timestep = timestep.expand(sample.shape[0])
        return self.run(sample, timestep, encoder_hidden_states)

    def example_inputs(self, batch: int, seed: int = 0, cond_shape: Optional[tuple[int, ...]] = None):
        if self.sample_shape is None:
            raise ValueError("engine manifest has no sample_shape")
        import torch

        g = torch.Generator().manual_seed(seed)
        x = torch.randn((batch, *self.sample_shape), generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        c = torch.randn((batch, *cond_shape), generator=g) if cond_shape else None
        return x, t, c

    def latency(self, batch: int = 1, warmup: int = 3, iters: int = 10, seed: int = 0,
                cond_shape: Optional[tuple[int, ...]] = None) -> LatencyStats:
        """Per-call latency at `batch` (median of `iters` timed runs after `warmup`)."""
        x, t, c = self.example_inputs(batch, seed, cond_shape)
        return time_cpu(lambda: self.run(x, t, c), batch, warmup, iters)
