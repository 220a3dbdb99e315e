"""OpenVINO CPU engine: compiles the exported QDQ ONNX as it is (no graph surgery) and records what really ran.

OpenVINO's CPU plugin turns QuantizeLinear/DequantizeLinear around Conv/MatMul into u8/i8 kernels itself, and runs
every other op (and any layer left in float by a mixed-precision plan) at its inference precision, which on an
AVX-512 BF16 CPU is bf16 by default, also for an FP32 model. So engine.json reports, per compute layer, the
precision the compiled model says it runs (`get_runtime_model()` rt_info `layerType` / `runtimePrecision`) and the
inference precision actually used, instead of what the graph asked for.
"""

from __future__ import annotations

import collections
import functools
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx

from .base import Engine, LatencyStats, cpu_info, cpu_isa, time_cpu
from .manifest import EngineInfo, read_manifest, write_manifest

ENGINE_FILE = "model.onnx"
PRECISIONS = ("default", "f32", "bf16", "f16")
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
INT_PRECISIONS = ("u8", "i8", "u4", "i4")


class OpenVinoUnavailable(RuntimeError):
    """The `openvino` package is not importable."""


@dataclass
class OvConfig:
    """How the OpenVINO engine is compiled: inference precision (default = the plugin's choice) and threads."""

    precision: str = "default"       # default | f32 | bf16 | f16 (INFERENCE_PRECISION_HINT)
    threads: int = 0                 # INFERENCE_NUM_THREADS (0 = plugin default: physical cores)
    # one static-shape model per batch seen: a dynamic batch dimension cost the INT8 teacher ~28 % and its FP
    # model ~18 % per call at batch 8 on the 2-core EPYC (issue 22), where SiLU+Q stay unfused elementwise nodes
    static_batch: bool = True
    device: str = "CPU"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def properties(self) -> dict[str, str]:
        if self.precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        props = {"PERFORMANCE_HINT": "LATENCY"}
        if self.precision != "default":
            props["INFERENCE_PRECISION_HINT"] = self.precision
        if self.threads:
            props["INFERENCE_NUM_THREADS"] = str(int(self.threads))
        return props


def import_openvino():
    try:
        import openvino as ov
    except ImportError as exc:
        raise OpenVinoUnavailable(f"openvino is not importable ({exc})") from None
    return ov


def openvino_available() -> bool:
    try:
        import_openvino()
        return True
    except OpenVinoUnavailable:
        return False


@functools.lru_cache(maxsize=1)
def _core():
    """One Core per process. Each Core loads its own CPU plugin, and each plugin swaps the thread's alternate
    signal stack in and restores the previous one when it is destroyed; plugins destroyed out of order left a
    freed stack installed, and the next SIGTERM/SIGINT then crashed the process (segfault instead of exit 143)."""
    return import_openvino().Core()


def compile_onnx(path: str | Path, cfg: Optional[OvConfig] = None, extra: Optional[dict[str, str]] = None,
                 batch: Optional[int] = None):
    """Read and compile an ONNX file for the CPU (with the batch dimension fixed to `batch` when given)."""
    cfg = cfg or OvConfig()
    core = _core()
    model = core.read_model(str(path))
    if batch:
        shapes = {}
        for inp in model.inputs:
            ps = inp.get_partial_shape()
            ps[0] = batch
            shapes[inp.get_any_name()] = ps
        model.reshape(shapes)
    return core.compile_model(model, cfg.device, {**cfg.properties(), **(extra or {})})


def inference_precision(compiled) -> str:
    """The precision the compiled model really infers in ('bf16', 'f32', ...), read back from the plugin."""
    try:
        return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
    except Exception:  # older releases return a string-like value
        return str(compiled.get_property("INFERENCE_PRECISION_HINT"))


def runtime_layers(compiled) -> list[dict[str, str]]:
    """Every node of the compiled (runtime) model: name, layerType, runtimePrecision, fused original layers."""
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        ri = op.get_rt_info()

        def get(key):
            return ri[key].astype(str) if key in ri else ""

        out.append({"name": op.get_friendly_name(), "type": get("layerType"), "precision": get("runtimePrecision"),
                    "original": get("originalLayersNames")})
    return out


def precision_summary(layers: list[dict[str, str]]) -> dict[str, Any]:
    """INT8 vs float counts of the compute layers (Convolution / FullyConnected / MatMul) as they run."""
    compute = [L for L in layers if L["type"] in COMPUTE_LAYERS]
    by = collections.Counter(f"{L['type']}:{L['precision']}" for L in compute)
    n_int = sum(1 for L in compute if L["precision"] in INT_PRECISIONS)
    return {"compute_layers": dict(sorted(by.items())), "n_int8_layers": n_int,
            "n_float_layers": len(compute) - n_int,
            "fused_subgraphs": dict(collections.Counter(L["precision"] for L in layers if L["type"] == "Subgraph"))}


def _input_meta(model: onnx.ModelProto) -> tuple[list[str], list[str], Optional[list[int]], str]:
    from .onnxruntime import _input_meta as meta

    return meta(model)


def build_ov_engine(onnx_path: str | Path, out_dir: str | Path, cfg: Optional[OvConfig] = None) -> EngineInfo:
    """Copy the ONNX unchanged into DIR/model.onnx, compile it, and write engine.json with the runtime precision of
    every compute layer, the OpenVINO version, the CPU ISA and the inference precision used."""
    ov = import_openvino()
    cfg = cfg or OvConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(onnx_path)
    dst = out / ENGINE_FILE
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
        for extra in src.parent.glob(src.name + ".data"):
            shutil.copyfile(extra, out / (ENGINE_FILE + ".data"))
            model_tmp = onnx.load(str(src), load_external_data=False)
            for t in model_tmp.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = ENGINE_FILE + ".data"
            onnx.save(model_tmp, str(dst))
    compiled = compile_onnx(dst, cfg)
    layers = runtime_layers(compiled)
    summ = precision_summary(layers)
    prec = inference_precision(compiled)
    model = onnx.load(str(dst), load_external_data=False)
    ins, outs, shape, t_dtype = _input_meta(model)
    notes = [f"OpenVINO {ov.__version__} on {cpu_isa() or 'CPU'}: inference precision {prec} "
             f"({'requested' if cfg.precision != 'default' else 'plugin default'}); {summ['n_int8_layers']} "
             f"compute layers run in int8, {summ['n_float_layers']} in float"]
    compute = [{"name": L["name"], "type": L["type"], "precision": L["precision"]} for L in layers
               if L["type"] in COMPUTE_LAYERS]
    info = EngineInfo(backend="openvino", engine_file=ENGINE_FILE, source_onnx=str(src.resolve()),
                      version=str(ov.__version__), input_names=ins, output_names=outs, sample_shape=shape,
                      timestep_dtype=t_dtype, device="cpu", executed=False, validated=False,
                      precision={"inference_precision": prec, "cpu": cpu_info()[0], "cpu_isa": cpu_isa(),
                                 "properties": cfg.properties(), **summ},
                      layers=compute, build_log=[f"compiled {len(layers)} runtime nodes for {cfg.device}"],
                      notes=notes, options=cfg.to_dict())
    write_manifest(info, out)
    return info


class OvEngine(Engine):
    """A built OpenVINO engine directory (or, via from_onnx, any ONNX file), callable as a UNetFn."""

    def __init__(self, engine_dir: str | Path, cfg: Optional[OvConfig] = None):
        self.info = read_manifest(engine_dir)
        known = set(OvConfig.__dataclass_fields__)
        opts = {k: v for k, v in (self.info.options or {}).items() if k in known}
        opts.setdefault("static_batch", False)  # manifests older than the option ran dynamic: keep them so
        if cfg is not None:
            opts["threads"] = cfg.threads
        self.cfg = OvConfig(**opts)
        self._static: dict[int, Any] = {}
        self._np_t = np.dtype(self.info.timestep_dtype)

    @functools.cached_property
    def compiled(self):
        """The dynamic-batch model: what a dynamic engine runs; a static one compiles it only when asked for its
        inference precision."""
        return compile_onnx(self.info.path, self.cfg)

    @functools.cached_property
    def request(self):
        return self.compiled.create_infer_request()

    @classmethod
    def from_onnx(cls, onnx_path: str | Path, cfg: Optional[OvConfig] = None,
                  out_dir: Optional[str | Path] = None) -> "OvEngine":
        return cls._built(build_ov_engine, onnx_path, cfg, out_dir, "pqcad_ov_")

    @property
    def inference_precision(self) -> str:
        return inference_precision(self.compiled)

    def feeds(self, sample, timestep, encoder_hidden_states=None) -> dict[str, np.ndarray]:
        from .onnxruntime import OrtEngine

        return OrtEngine.feeds(self, sample, timestep, encoder_hidden_states)  # same input contract

    def _request(self, batch: int):
        if not self.cfg.static_batch:
            return self.request
        if batch not in self._static:
            self._static[batch] = compile_onnx(self.info.path, self.cfg, batch=batch).create_infer_request()
        return self._static[batch]

    def run(self, sample, timestep, encoder_hidden_states=None):
        import torch  # here, not at import: the bench worker process times compiled models without torch

        res = self._request(int(sample.shape[0])).infer(self.feeds(sample, timestep, encoder_hidden_states))
        out = torch.from_numpy(np.array(next(iter(res.values())), dtype=np.float32, copy=True))
        return out.to(sample.device) if torch.is_tensor(sample) else out

    def latency(self, batch: int = 1, warmup: int = 3, iters: int = 10, seed: int = 0,
                cond_shape=None) -> LatencyStats:
        x, t, c = self.example_inputs(batch, seed, cond_shape)
        f = self.feeds(x, t, c)  # time the infer request itself, not the torch<->numpy copies
        req = self._request(batch)
        return time_cpu(lambda: req.infer(f), batch, warmup, iters)
