"""`pqcad-export engine`: build a TensorRT plan or an ONNX Runtime engine directory from QDQ ONNX."""

from __future__ import annotations

import click

from engines import BACKENDS

from ..cli import friendly, main


@main.command()
@click.option("--onnx", "onnx_file", required=True, type=click.Path(), help="QDQ ONNX (export --out)")
@click.option("--out", required=True, type=click.Path(), help="engine directory (plan/model + engine.json)")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(BACKENDS),
              help="auto = TensorRT when importable and a GPU is present, else the faster of ONNX Runtime and "
                   "OpenVINO measured here; tensorrt-rtx = ahead-of-time build for --compute-capability "
                   "(validation, not runnable here)")
@click.option("--max-batch", default=64, show_default=True, help="TensorRT optimization profile maximum batch")
@click.option("--opt-batch", default=8, show_default=True, help="TensorRT optimization profile optimum batch")
@click.option("--compute-capability", default="SM89", show_default=True, help="tensorrt-rtx AOT target")
@click.option("--ort-mode", default="int8", show_default=True, type=click.Choice(["int8", "qdq"]),
              help="onnxruntime: int8 = u8 activations + requantized Conv outputs (INT8 kernels); qdq = exact "
                   "graph (Conv on FP32 kernels)")
@click.option("--threads", default=0, show_default=True, help="onnxruntime / openvino threads (0 = default)")
@click.option("--ov-precision", default="default", show_default=True,
              type=click.Choice(["default", "f32", "bf16", "f16"]),
              help="openvino: inference precision of the float parts (default = the plugin's, bf16 on AVX-512 BF16)")
@click.option("--ov-dynamic-batch", is_flag=True,
              help="openvino: one model with a dynamic batch dimension (default: one static-shape model compiled "
                   "per batch it is called with, faster per call)")
@friendly
def engine(onnx_file, out, backend, max_batch, opt_batch, compute_capability, ort_mode, threads, ov_precision,
           ov_dynamic_batch):
    """Build an engine and write engine.json (backend, versions, per-layer precision, build log)."""
    from rich.console import Console
    from rich.table import Table

    from engines import EngineError, build_engine, resolve_backend
    from engines.onnxruntime import OrtConfig
    from engines.openvino import OvConfig
    from engines.tensorrt import TrtConfig

    from .. import checks
    from ..errors import PqcadError
    from ..export.lint import read_onnx_header

    read_onnx_header(onnx_file, "--onnx")  # not ONNX / empty: one line, before anything is written
    checks.writable_dir(out)
    con = Console(stderr=True)
    try:
        chosen, why = resolve_backend(backend)
        con.print(f"backend: [bold]{chosen}[/] ({why})")
        trt_cfg = TrtConfig(max_batch=max_batch, opt_batch=opt_batch,
                            compute_capability=compute_capability if chosen == "tensorrt-rtx" else None)
        with con.status(f"building {chosen} engine..."):
            info = build_engine(onnx_file, out, backend, trt_config=trt_cfg,
                                ort_config=OrtConfig(mode=ort_mode, intra_op_threads=threads),
                                ov_config=OvConfig(precision=ov_precision, threads=threads,
                                                  static_batch=not ov_dynamic_batch))
    except EngineError as exc:
        raise PqcadError(str(exc)) from None
    t = Table(title=f"{info.backend} {info.version} -> {out}")
    t.add_column("key")
    t.add_column("value", overflow="fold")
    for k, v in info.precision.items():
        if k in ("op_counts", "properties"):
            continue
        t.add_row(str(k), str(v))
    con.print(t)
    for n in info.notes:
        con.print(f"note: {n}")
    state = "validated (parsed + built, not executed here)" if info.validated else "built"
    con.print(f"engine {state}: {info.path}")
