"""TensorRT engines from QDQ ONNX: explicit quantization (the graph's Q/DQ decide what runs in INT8).

One build path serves two libraries with the same builder/ONNX-parser API:
  * `tensorrt` (full TensorRT, users' GPU machines): INT8 + FP16 (or strongly typed), optimization profile over
    batch, timing cache, serialized plan, per-layer precision from the engine inspector; runs with CUDA buffers.
  * `tensorrt_rtx_bindings` (TensorRT-RTX): parses and builds ahead-of-time on a CPU for a chosen compute
    capability (SM89/SM86...). It cannot run here (no GPU), so it is the CI oracle: "validated", not "executed".
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Engine, LatencyStats, time_cuda
from .manifest import read_manifest
from .tensorrt_build import ParseResult, build_trt_engine, network_quant_summary, parse_onnx
from .trt_common import FLAVORS, PLAN_FILE, TIMING_CACHE_FILE, TensorRTBuildError, TensorRTUnavailable, TrtConfig, \
    _dtype_name, _gc_paused, _make_logger, import_tensorrt, tensorrt_available

__all__ = ["FLAVORS", "PLAN_FILE", "TIMING_CACHE_FILE", "TensorRTBuildError", "TensorRTUnavailable", "TrtConfig",
           "import_tensorrt", "tensorrt_available", "ParseResult", "parse_onnx", "network_quant_summary",
           "build_trt_engine", "TrtEngine"]


class TrtEngine(Engine):
    """A TensorRT plan run with torch CUDA tensors as device buffers (execute_async_v3)."""

    @_gc_paused
    def __init__(self, engine_dir: str | Path):
        self.info = read_manifest(engine_dir)
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("running a TensorRT engine needs a CUDA GPU")
        if self.info.device.startswith("aot:"):
            raise TensorRTUnavailable(f"engine was built ahead-of-time for {self.info.device[4:]} by "
                                      f"{self.info.backend}; it is not runnable on this GPU")
        self.trt = import_tensorrt(self.info.backend)
        self.log = _make_logger(self.trt, "WARNING")
        self.runtime = self.trt.Runtime(self.log)
        self.engine = self.runtime.deserialize_cuda_engine(self.info.path.read_bytes())
        if self.engine is None:
            raise TensorRTBuildError(f"could not deserialize {self.info.path}", self.log.errors)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._dtypes = {}
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            self._dtypes[n] = _torch_dtype(self.engine.get_tensor_dtype(n))

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")

    def _bind(self, sample, timestep, encoder_hidden_states):
        names = self.info.input_names
        feeds = {names[0]: sample}
        if "timestep" in names:
            feeds["timestep"] = timestep.reshape(-1)
        if "encoder_hidden_states" in names:
            feeds["encoder_hidden_states"] = encoder_hidden_states
        bufs = {}
        for n, v in feeds.items():
            v = v.to(device="cuda", dtype=self._dtypes[n]).contiguous()
            bufs[n] = v
            self.context.set_input_shape(n, tuple(v.shape))
            self.context.set_tensor_address(n, v.data_ptr())
        for n in self.info.output_names:
            shp = tuple(self.context.get_tensor_shape(n))
            o = torch.empty(shp, device="cuda", dtype=self._dtypes[n])
            bufs[n] = o
            self.context.set_tensor_address(n, o.data_ptr())
        return bufs

    def _exec(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")

    def run(self, sample, timestep, encoder_hidden_states=None):
        with torch.cuda.stream(self.stream):
            bufs = self._bind(sample, timestep, encoder_hidden_states)
            self._exec()
        self.stream.synchronize()
        out = bufs[self.info.output_names[0]].float()
        return out.to(sample.device)

    def latency(self, batch: int = 1, warmup: int = 10, iters: int = 50, seed: int = 0,
                cond_shape=None) -> LatencyStats:
        x, t, c = self.example_inputs(batch, seed, cond_shape)
        with torch.cuda.stream(self.stream):
            self._bufs = self._bind(x, t, c)  # keep buffers alive while timing
            return time_cuda(self._exec, batch, warmup, iters, self.stream)


def _torch_dtype(dt) -> torch.dtype:
    name = _dtype_name(dt)
    return {"float": torch.float32, "half": torch.float16, "int32": torch.int32, "int64": torch.int64,
            "int8": torch.int8, "bool": torch.bool, "bf16": torch.bfloat16}.get(name, torch.float32)
