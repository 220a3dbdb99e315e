"""TensorRT engines from QDQ ONNX: explicit quantization (the graph's Q/DQ decide what runs in INT8).

One build path serves two libraries with the same builder/ONNX-parser API:
  * `tensorrt` (full TensorRT, users' GPU machines): INT8 + FP16 (or strongly typed), optimization profile over
    batch, timing cache, serialized plan, per-layer precision from the engine inspector; runs with CUDA buffers.
  * `tensorrt_rtx_bindings` (TensorRT-RTX): parses and builds ahead-of-time on a CPU for a chosen compute
    capability (SM89/SM86...). It cannot run here (no GPU), so it is the CI oracle: "validated", not "executed".
"""

from __future__ import annotations

import functools
import gc

import importlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .base import Engine, LatencyStats, time_cuda
from .manifest import EngineInfo, atomic_write_bytes, read_manifest, write_manifest

PLAN_FILE = "unet.plan"
TIMING_CACHE_FILE = "timing.cache"
FLAVORS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}


class TensorRTUnavailable(RuntimeError):
    """The requested TensorRT library cannot be imported."""


class TensorRTBuildError(RuntimeError):
    """Parsing or building failed; the message carries the parser/builder errors."""

    def __init__(self, message: str, errors: list[str]):
        super().__init__(message)
        self.errors = errors


def import_tensorrt(flavor: str = "tensorrt"):
    """Import `tensorrt` or `tensorrt_rtx_bindings`; TensorRTUnavailable with the reason if missing."""
    mod = FLAVORS.get(flavor)
    if mod is None:
        raise ValueError(f"unknown TensorRT flavor {flavor!r} ({', '.join(FLAVORS)})")
    try:
        return importlib.import_module(mod)
    except Exception as exc:  # ImportError, or a broken stub wheel raising at import
        raise TensorRTUnavailable(f"{mod} is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def tensorrt_available(flavor: str = "tensorrt") -> bool:
    try:
        import_tensorrt(flavor)
        return True
    except TensorRTUnavailable:
        return False


@dataclass
class TrtConfig:
    """Build options. Batch profile applies to every input whose first dim is dynamic."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    fp16: bool = True                  # non-quantized layers may run in FP16 (weakly typed networks)
    strongly_typed: bool = False       # types follow the ONNX graph exactly (TensorRT >= 9)
    workspace_gib: float = 4.0
    builder_optimization_level: int = 3
    compute_capability: Optional[str] = None  # TensorRT-RTX AOT target, e.g. "SM89"; None = current GPU
    timing_cache: Optional[str] = None        # path; default <out>/timing.cache (full TensorRT only)
    detailed_profiling: bool = True           # needed for per-layer precision in the inspector

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _make_logger(trt, min_severity: str = "INFO"):
    order = ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"]
    keep = order[: order.index(min_severity) + 1]

    class _Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, msg):
            sev = str(severity).split(".")[-1]
            if sev in keep:
                self.lines.append(f"[{sev}] {msg}")
            if sev in ("ERROR", "INTERNAL_ERROR"):
                self.errors.append(msg)

    return _Log()


def _dtype_name(dt) -> str:
    return str(dt).split(".")[-1].split(":")[0].strip("<> ").lower()


def network_quant_summary(network, trt) -> dict[str, Any]:
    """Which compute layers the network runs on quantized inputs (explicit quantization, before fusion).

    A Conv/MatMul whose inputs come from DEQUANTIZE layers of INT8 tensors runs as an INT8 kernel in TensorRT;
    one of INT4 weights is an INT4 weight-only GEMM. Counted from the parsed network (works without a GPU).
    """
    producer = {}
    for i in range(network.num_layers):
        L = network.get_layer(i)
        for j in range(L.num_outputs):
            producer[L.get_output(j).name] = L
    T = trt.LayerType
    layers = []
    counts = {"int8": 0, "int4_weight_only": 0, "float": 0}
    for i in range(network.num_layers):
        L = network.get_layer(i)
        if L.type not in (T.CONVOLUTION, T.MATRIX_MULTIPLY, T.DECONVOLUTION):
            continue
        qin = []
        for j in range(min(2, L.num_inputs)):
            t = L.get_input(j)
            p = producer.get(t.name) if t is not None else None
            hops = 0
            while p is not None and p.type in (T.SHUFFLE, T.IDENTITY) and hops < 4:  # rank broadcast of weights
                t = p.get_input(0)
                p = producer.get(t.name) if t is not None else None
                hops += 1
            if p is not None and p.type == T.DEQUANTIZE:
                qin.append(_dtype_name(p.get_input(0).dtype))
            else:
                qin.append(None)
        if len(qin) == 2 and qin[0] == "int8" and qin[1] == "int8":
            prec = "int8"
        elif len(qin) == 2 and qin[1] == "int4" and qin[0] is None:
            prec = "int4_weight_only"
        else:
            prec = "float"
        counts[prec] += 1
        layers.append({"name": L.name, "type": str(L.type).split(".")[-1], "inputs": qin, "precision": prec,
                       "source": "network"})
    return {"counts": counts, "layers": layers, "num_layers": network.num_layers}


@dataclass
class ParseResult:
    ok: bool
    errors: list[str]
    builder: Any = None
    network: Any = None
    parser: Any = None
    logger: Any = None
    summary: dict[str, Any] = field(default_factory=dict)


def _gc_paused(fn):
    """Run fn with Python's cyclic GC paused (after one collection). TensorRT calls our Python logger while holding
    its builder mutex; a GC pass triggered inside that callback can free an older IBuilder, whose destructor
    takes the same mutex: a deadlock (seen with TensorRT-RTX 1.7 in a long test session)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.collect()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper


@_gc_paused
def parse_onnx(onnx_path: str | Path, trt, strongly_typed: bool = False) -> ParseResult:
    """Parse with the TensorRT ONNX parser; collects readable errors instead of raising."""
    log = _make_logger(trt)
    builder = trt.Builder(log)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    ok = bool(parser.parse_from_file(str(onnx_path)))
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = ""
        try:
            node = f" [node {e.node()} {e.node_name()} {e.node_operator()}]"
        except Exception:
            pass
        errors.append(f"{e.desc()}{node}")
    if not ok and not errors:
        errors = log.errors[-5:] or ["ONNX parser failed without a message"]
    res = ParseResult(ok=ok, errors=errors, builder=builder, network=network, parser=parser, logger=log)
    if ok:
        res.summary = network_quant_summary(network, trt)
    return res


def _profile_shapes(network, cfg: TrtConfig) -> dict[str, tuple]:
    shapes = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if any(d < 0 for d in dims[1:]):
            raise TensorRTBuildError(f"input {t.name} has dynamic non-batch dims {dims}; export static shapes", [])
        if dims and dims[0] < 0:
            mn, mx = max(1, cfg.min_batch), max(1, cfg.min_batch, cfg.max_batch)
            op = min(max(cfg.opt_batch, mn), mx)
            shapes[t.name] = tuple((b, *dims[1:]) for b in (mn, op, mx))
    return shapes


@_gc_paused
def build_trt_engine(onnx_path: str | Path, out_dir: str | Path, cfg: Optional[TrtConfig] = None,
                     flavor: str = "tensorrt") -> EngineInfo:
    """Parse + build a serialized plan into out_dir with engine.json. Raises TensorRTBuildError with messages."""
    cfg = cfg or TrtConfig()
    trt = import_tensorrt(flavor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rtx = flavor == "tensorrt-rtx"
    t0 = time.time()
    pr = parse_onnx(onnx_path, trt, strongly_typed=cfg.strongly_typed)
    if not pr.ok:
        raise TensorRTBuildError(f"{flavor} ONNX parser rejected {Path(onnx_path).name}: {pr.errors[0]}", pr.errors)
    builder, network, log = pr.builder, pr.network, pr.logger
    config = builder.create_builder_config()
    notes: list[str] = []
    if hasattr(config, "set_memory_pool_limit") and hasattr(trt, "MemoryPoolType"):
        try:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gib * (1 << 30)))
        except Exception:
            pass
    if not cfg.strongly_typed:
        for flag in ("FP16", "INT8"):  # INT8 is implied by Q/DQ in TensorRT 10; harmless where it exists
            if (flag == "INT8" or cfg.fp16) and hasattr(trt.BuilderFlag, flag):
                config.set_flag(getattr(trt.BuilderFlag, flag))
    if rtx:
        notes.append("TensorRT-RTX networks are strongly typed: non-quantized layers keep the ONNX dtype (FP32)")
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(cfg.builder_optimization_level)
    if cfg.detailed_profiling and hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if cfg.compute_capability:
        if not hasattr(config, "set_compute_capability"):
            raise TensorRTBuildError(f"{flavor} has no ahead-of-time compute capability targets", [])
        cc = getattr(trt.ComputeCapability, cfg.compute_capability.upper(), None)
        if cc is None:
            raise TensorRTBuildError(f"unknown compute capability {cfg.compute_capability}; one of "
                                     f"{', '.join(trt.ComputeCapability.__members__)}", [])
        config.num_compute_capabilities = 1
        config.set_compute_capability(cc, 0)
    shapes = _profile_shapes(network, cfg)
    if shapes:
        prof = builder.create_optimization_profile()
        for name, (mn, op, mx) in shapes.items():
            prof.set_shape(name, mn, op, mx)
        if config.add_optimization_profile(prof) < 0:
            raise TensorRTBuildError(f"invalid optimization profile {shapes}", log.errors[-3:])
    cache_path = Path(cfg.timing_cache) if cfg.timing_cache else out / TIMING_CACHE_FILE
    use_cache = not rtx and hasattr(config, "create_timing_cache")
    if use_cache:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errs = log.errors[-5:] or ["builder returned no plan"]
        raise TensorRTBuildError(f"{flavor} build failed: {errs[-1]}", errs)
    atomic_write_bytes(out / PLAN_FILE, bytes(plan))
    if use_cache:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    layers = pr.summary.get("layers", [])
    engine_layers = _inspect_plan(trt, bytes(plan), log)
    if engine_layers is not None:
        layers = engine_layers
    else:
        notes.append("per-layer precision from the parsed network (the plan cannot be deserialized without a "
                     "matching GPU)")
    ins = [network.get_input(i).name for i in range(network.num_inputs)]
    outs = [network.get_output(i).name for i in range(network.num_outputs)]
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    shape = [int(v) for v in meta["pqcad.sample_shape"].split(",")] if "pqcad.sample_shape" in meta else (
        list(network.get_input(0).shape)[1:] if network.num_inputs else None)
    tdt = "float32"
    for i in range(network.num_inputs):
        if network.get_input(i).name == "timestep":
            tdt = _dtype_name(network.get_input(i).dtype).replace("float", "float32").replace("float3232", "float32")
    info = EngineInfo(
        backend=flavor, engine_file=PLAN_FILE, source_onnx=str(Path(onnx_path).resolve()), version=trt.__version__,
        input_names=ins, output_names=outs, sample_shape=shape, timestep_dtype=tdt,
        batch_profile=[v[0] for v in next(iter(shapes.values()))] if shapes else None,
        device=(f"aot:{cfg.compute_capability.upper()}" if cfg.compute_capability else "cuda"),
        executed=False, validated=True,
        precision={"quantized_layers": pr.summary.get("counts", {}), "fp16": bool(cfg.fp16 and not rtx),
                   "strongly_typed": bool(cfg.strongly_typed or rtx), "plan_bytes": len(bytes(plan)),
                   "build_seconds": round(time.time() - t0, 2)},
        layers=layers, build_log=log.lines[-400:], notes=notes, options=cfg.to_dict())
    write_manifest(info, out)
    return info


def _inspect_plan(trt, plan: bytes, log) -> Optional[list[dict[str, Any]]]:
    """Per-layer precision from the engine inspector; None when no GPU can deserialize the plan."""
    if not torch.cuda.is_available():
        return None
    try:
        runtime = trt.Runtime(log)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            return None
        insp = engine.create_engine_inspector()
        data = json.loads(insp.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:
        return None
    out = []
    for L in data.get("Layers", []):
        if isinstance(L, str):
            out.append({"name": L, "source": "engine"})
            continue
        precs = sorted({str(t.get("Format/Datatype", "")) for t in L.get("Inputs", []) + L.get("Outputs", [])})
        out.append({"name": L.get("Name"), "type": L.get("LayerType"), "tactic": L.get("TacticName"),
                    "formats": precs, "source": "engine"})
    return out


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
