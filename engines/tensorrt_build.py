"""Building a TensorRT (or TensorRT-RTX ahead-of-time) plan from QDQ ONNX: parse, quantization summary of the
network, optimization profile, build, engine.json with the per-layer precision from the inspector."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .manifest import EngineInfo, atomic_write_bytes, write_manifest
from .trt_common import PLAN_FILE, TIMING_CACHE_FILE, TensorRTBuildError, TrtConfig, \
    _dtype_name, _gc_paused, _make_logger, import_tensorrt


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
