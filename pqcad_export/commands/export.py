"""`pqcad-export export`: quantized model -> QDQ ONNX (+ lint.json and parity.json next to it)."""

from __future__ import annotations

import click

from ..cli import friendly, main


@main.command()
@click.option("--quantized", required=True, type=click.Path(), help="quantized (or distilled) model directory")
@click.option("--out", required=True, type=click.Path(), help="output .onnx file")
@click.option("--int4-weight-only-matmul", is_flag=True,
              help="pack 4-bit Linear weights as INT4 blocked DequantizeLinear (opset 21); their activations "
                   "stay unquantized (TensorRT INT4 is weight-only)")
@click.option("--opset", default=17, show_default=True, help="ONNX opset (>= 17; 21 is used with INT4)")
@click.option("--external-data", is_flag=True, help="store weights in FILE.onnx.data (automatic above 1 GiB)")
@click.option("--no-parity", is_flag=True, help="skip the ONNX Runtime vs PyTorch parity check")
@friendly
def export(quantized, out, int4_weight_only_matmul, opset, external_data, no_parity):
    """Export QDQ ONNX carrying exactly the learned integers and scales."""
    from pathlib import Path

    from rich.console import Console

    from ..errors import UsageError
    from ..export.lint import render_report, lint_model
    from ..export.onnx import ExportConfig
    from ..export.stage import export_quantized

    if not str(out).endswith(".onnx"):
        raise UsageError(f"--out must be a .onnx file, got {out}")
    if opset < 17:
        raise UsageError(f"--opset {opset}: QDQ export needs opset >= 17")
    from .. import checks
    from ..export.parity import ParityConfig

    checks.writable_file(out)
    tokens = _cond_tokens(Path(quantized))
    con = Console(stderr=True)
    cfg = ExportConfig(opset=opset, int4_weight_only_matmul=int4_weight_only_matmul,
                       external_data=True if external_data else None, cond_seq_len=tokens)
    pcfg = ParityConfig(cond_seq_len=tokens) if tokens else None
    with con.status("exporting QDQ ONNX..."):
        res = export_quantized(quantized, out, cfg, parity=not no_parity, fail_on_lint=False, parity_cfg=pcfg)
    e = res.export
    con.print(f"wrote {e['path']} (opset {e['opset']}, {e['int8_weights']} INT8 + {e['int4_weights']} INT4 "
              f"weights, {e['activation_qdq']} activation Q/DQ)")
    for lab in e["labels"]:
        con.print(f"  {lab}")
    render_report(lint_model(Path(out)), con)
    if res.parity is not None:
        p = res.parity
        con.print(f"parity vs {p['reference']}: rel L2 {p['rel_l2']:.3g}, {p['samples_within_tol']}/"
                  f"{p['samples_total']} samples within {p['config']['tol']:g}; initializers "
                  f"{'equal' if p['initializers']['ok'] else 'DIFFER'}; {'PASS' if p['ok'] else 'FAIL'}")
        for n in p["notes"]:
            con.print(f"  {n}")
    from ..errors import PqcadError

    if not res.lint["ok"]:
        raise PqcadError(f"exported ONNX fails the TensorRT rule check ({res.lint['n_errors']} violations)")
    if res.parity is not None and not res.parity["ok"]:
        raise PqcadError("ONNX Runtime vs PyTorch parity failed (see parity.json)")


def _cond_tokens(quantized_dir) -> int:
    """The conditioning length the model was calibrated with (quant.json `conditioning`), 0 = the default."""
    import json

    try:
        meta = json.loads((quantized_dir / "quant.json").read_text())
    except (OSError, ValueError):
        return 0  # export_quantized explains a missing or corrupt quant.json
    shape = (meta.get("conditioning") or {}).get("shape")
    return int(shape[1]) if shape else 0
