"""ONNX Runtime engine: a session that runs the QDQ graph on INT8 kernels (CPU), or the CUDA EP where installed.

Why a rewritten CPU copy: ORT only fuses DequantizeLinear->Conv into an INT8 kernel (QLinearConv) when the Conv
output is quantized too, and x86 VNNI kernels prefer uint8 activations x int8 weights. The TensorRT graph keeps
int8 / zero point 0 and float Conv outputs; the CPU copy (mode "int8") therefore
  * carries every symmetric int8 activation Q/DQ as uint8 with zero point 128 (identical math), and
  * quantizes each quantized Conv's output with an asymmetric uint8 scale calibrated on the QDQ graph itself
    (the only approximation; its measured effect is recorded in engine.json as `requant_rel_l2`), and
  * on x86 CPUs without VNNI, also carries the int8 weights as uint8 with zero point 128 (identical math): there
    MLAS's u8 x s8 kernels add pairs of products in saturating int16 (vpmaddubsw), which gave a W8A8 UNet a
    per-call relative L2 error of 0.43 against the exact graph (0.07 with u8 weights) on an AVX2 EPYC.
Mode "qdq" runs the exported graph unchanged (exact math; Conv runs on FP32 kernels with dequantized weights,
MatMul/Gemm with quantized inputs still fuse into MatMulIntegerToFloat).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx

from .base import Engine, LatencyStats, time_cpu
from .manifest import EngineInfo, read_manifest, write_manifest
from .ort_int8 import _random_feeds, layer_counts, quantized_convs, to_cpu_int8, x86_without_vnni
from .ort_session import ENGINE_FILE, INT8_KERNELS, LEVELS, QUANT_COMPUTE, OrtConfig, _ort, available_providers, \
    kernel_summary, make_session, pick_providers, session_options

__all__ = ["ENGINE_FILE", "INT8_KERNELS", "LEVELS", "QUANT_COMPUTE", "OrtConfig", "available_providers",
           "pick_providers", "session_options", "make_session", "kernel_summary", "quantized_convs",
           "x86_without_vnni", "to_cpu_int8", "layer_counts", "build_ort_engine", "OrtEngine"]


# ----------------------------------------------------------------------------------------------- engine
def _input_meta(model: onnx.ModelProto) -> tuple[list[str], list[str], Optional[list[int]], str]:
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    meta = {p.key: p.value for p in model.metadata_props}
    shape = None
    if "pqcad.sample_shape" in meta:
        shape = [int(v) for v in meta["pqcad.sample_shape"].split(",")]
    else:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[1:]):
            shape = [d.dim_value for d in dims[1:]]
    t_dtype = "float32"
    for i in model.graph.input:
        if i.name == "timestep":
            t_dtype = str(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
    return ins, outs, shape, t_dtype


def build_ort_engine(onnx_path: str | Path, out_dir: str | Path, cfg: Optional[OrtConfig] = None,
                     calib_feeds: Optional[dict[str, np.ndarray]] = None) -> EngineInfo:
    """Write DIR/model.onnx (the copy ORT runs) + DIR/engine.json with the kernels that actually run."""
    cfg = cfg or OrtConfig()
    if cfg.mode not in ("int8", "qdq"):
        raise ValueError(f"unknown ORT mode {cfg.mode!r} (int8|qdq)")
    ort = _ort()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = onnx.load(str(onnx_path))
    log: list[str] = []
    notes: list[str] = []
    stats: dict[str, Any] = {}
    if cfg.mode == "int8" and pick_providers(cfg.provider)[0].startswith("CUDA"):
        cfg = OrtConfig(**{**cfg.to_dict(), "mode": "qdq"})
        notes.append("CUDA execution provider: running the exported QDQ graph as is (the u8/requant rewrite is "
                     "for x86 CPU kernels)")
    if cfg.mode == "int8":
        model, stats = to_cpu_int8(src, cfg, calib_feeds)
        source = (f"{len(next(iter(calib_feeds.values())))} calibration inputs" if calib_feeds
                  else f"{cfg.calib_samples} N(0,1) samples")
        if stats.get("u8_weights"):
            notes.append(f"x86 CPU without VNNI: {stats['u8_weights']} int8 weights carried as uint8 zp128 (u8 x u8 "
                         "kernels; u8 x s8 saturates in int16 on AVX2). An engine built on a VNNI CPU keeps s8 "
                         "weights: rebuild it on the CPU that runs it")
        log.append(f"cpu int8 copy: {stats['u8_activation_qdq']} activation Q/DQ as u8 zp128, "
                   f"{stats['requantized_conv_outputs']} Conv outputs requantized (calibrated on {source})")
    else:
        model = src
    from pqcad_export.export.graph_cost import remove_dead_initializers

    if remove_dead_initializers(model):  # the shipped model.onnx carries no unused initializer
        log.append("removed initializers no node reads")
    if model.ByteSize() > (1 << 30):  # protobuf's 2 GiB limit
        onnx.save_model(model, str(out / ENGINE_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=ENGINE_FILE + ".data")
    else:
        onnx.save(model, str(out / ENGINE_FILE))
    ks = kernel_summary(out / ENGINE_FILE, cfg)
    log.append(f"kernels after ORT optimisation ({cfg.optimization_level}): {ks['op_counts']}")
    ins, outs, shape, t_dtype = _input_meta(src)
    providers = pick_providers(cfg.provider)
    # measured effect of the CPU copy vs the exported QDQ graph on the same inputs
    if cfg.mode == "int8" and stats.get("requantized_conv_outputs"):
        feeds = _random_feeds(src, 4, cfg.calib_seed + 1)
        ref = make_session(src, OrtConfig(mode="qdq", provider="cpu", optimization_level="basic")).run(None, feeds)[0]
        got = make_session(out / ENGINE_FILE, OrtConfig(**{**cfg.to_dict(), "provider": "cpu"})).run(None, feeds)[0]
        rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
        stats["requant_rel_l2"] = rel
        notes.append(f"CPU int8 copy requantizes Conv outputs to uint8 (not in the exported graph); relative L2 "
                     f"vs the exported QDQ graph on random inputs: {rel:.3g}")
    if ks["n_float_compute"]:
        notes.append(f"{ks['n_float_compute']} Conv/MatMul/Gemm run on float kernels: {ks['float_compute']}")
    info = EngineInfo(backend="onnxruntime", engine_file=ENGINE_FILE, source_onnx=str(Path(onnx_path).resolve()),
                      version=ort.__version__, input_names=ins, output_names=outs, sample_shape=shape,
                      timestep_dtype=t_dtype, device="cuda" if providers[0].startswith("CUDA") else "cpu",
                      executed=False, validated=False,
                      precision={"mode": cfg.mode, "providers": providers, **ks, **stats, **layer_counts(src)},
                      layers=[], build_log=log, notes=notes, options=cfg.to_dict())
    write_manifest(info, out)
    return info


class OrtEngine(Engine):
    """A built ONNX Runtime engine directory, callable as a UNetFn."""

    def __init__(self, engine_dir: str | Path, cfg: Optional[OrtConfig] = None):
        self.info = read_manifest(engine_dir)
        opts = dict(self.info.options or {})
        if cfg is not None:
            opts.update({k: v for k, v in cfg.to_dict().items() if k in ("intra_op_threads", "inter_op_threads",
                                                                          "provider", "optimization_level")})
        known = set(OrtConfig.__dataclass_fields__)
        self.cfg = OrtConfig(**{k: (tuple(v) if k == "requant_max_ratio" else v) for k, v in opts.items()
                                if k in known})
        prec = self.info.precision or {}
        if (prec.get("mode") == "int8" and "u8_weights" not in prec and self.cfg.u8_weights != "no"
                and x86_without_vnni()):
            from . import EngineError

            raise EngineError(f"{engine_dir}: this INT8 engine keeps int8 weights (built on a CPU with VNNI); on this "
                              "x86 CPU without VNNI its u8 x s8 kernels saturate and give wrong outputs: rebuild the "
                              "engine on this machine")
        self.session = make_session(self.info.path, self.cfg)
        self._np_t = np.dtype(self.info.timestep_dtype)

    @classmethod
    def from_onnx(cls, onnx_path: str | Path, cfg: Optional[OrtConfig] = None,
                  out_dir: Optional[str | Path] = None) -> "OrtEngine":
        return cls._built(build_ort_engine, onnx_path, cfg, out_dir, "pqcad_ort_")

    def feeds(self, sample, timestep, encoder_hidden_states=None) -> dict[str, np.ndarray]:
        import torch  # here, not at import: the bench worker process times sessions without torch

        names = self.info.input_names
        x = sample.detach().to("cpu", torch.float32).numpy() if torch.is_tensor(sample) else np.asarray(sample,
                                                                                                        np.float32)
        f = {names[0]: np.ascontiguousarray(x)}
        if "timestep" in names:
            t = timestep.detach().cpu().numpy() if torch.is_tensor(timestep) else np.asarray(timestep)
            f["timestep"] = np.ascontiguousarray(t.astype(self._np_t).reshape(-1))
        if "encoder_hidden_states" in names:
            if encoder_hidden_states is None:
                raise ValueError("this engine needs encoder_hidden_states")
            f["encoder_hidden_states"] = encoder_hidden_states.detach().cpu().float().numpy()
        return f

    def run(self, sample, timestep, encoder_hidden_states=None):
        import torch

        out = self.session.run(None, self.feeds(sample, timestep, encoder_hidden_states))[0]
        res = torch.from_numpy(out)
        return res.to(sample.device) if torch.is_tensor(sample) else res

    def latency(self, batch: int = 1, warmup: int = 3, iters: int = 10, seed: int = 0,
                cond_shape=None) -> LatencyStats:
        x, t, c = self.example_inputs(batch, seed, cond_shape)
        f = self.feeds(x, t, c)  # time the session itself, not the torch<->numpy copies
        return time_cpu(lambda: self.session.run(None, f), batch, warmup, iters)
