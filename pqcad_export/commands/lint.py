"""`pqcad-export lint`: the TensorRT QDQ rule check of an ONNX file (exit 1 on a violation)."""

from __future__ import annotations

import click

from ..cli import friendly, main


@main.command()
@click.argument("onnx_file", type=click.Path())
@click.option("--json", "json_out", default=None, type=click.Path(), help="also write the report as JSON")
@friendly
def lint(onnx_file, json_out):
    """Check ONNX_FILE against TensorRT's explicit-quantization rules."""
    import json
    from pathlib import Path

    from rich.console import Console

    from ..errors import PqcadError
    from ..export.lint import lint_model, render_report

    if json_out:
        from .. import checks

        checks.writable_file(json_out, "--json")
    rep = lint_model(onnx_file)
    render_report(rep, Console())
    if json_out:
        from engines.manifest import atomic_write_text

        atomic_write_text(Path(json_out), json.dumps(rep.to_dict(), indent=2))
    if not rep.ok:
        v = rep.errors[0]
        raise PqcadError(f"{len(rep.errors)} TensorRT QDQ rule violation(s); first: {v.rule} at {v.node}: "
                         f"{v.message}")
