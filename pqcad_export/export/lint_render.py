"""The console view of a lint report (rich table of violations + a one-line verdict), apart from the checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lint import LintReport


def render_report(rep: LintReport, console=None) -> None:
    """Readable rich table of the violations plus a one-line verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = rep.stats
    console.print(f"[bold]{rep.path or 'model'}[/]: opset {rep.opset}, {s.get('nodes', 0)} nodes, "
                  f"{s.get('quantized_conv', 0)} quantized Conv, {s.get('quantized_matmul_gemm', 0)} quantized "
                  f"MatMul/Gemm, {s.get('int4_weights', 0)} INT4 weights, expectations "
                  f"{s.get('expected_ok', 0)}/{s.get('expected', 0)} met")
    fl = s.get("float_input_layers") or []
    if fl:
        console.print(f"{len(fl)} layer(s) with floating-point inputs (no Q/DQ; FP16 in TensorRT): {', '.join(fl)}")
    if rep.violations:
        t = Table(title="TensorRT QDQ rule check")
        for c in ("severity", "rule", "node", "message"):
            t.add_column(c, overflow="fold")
        for v in rep.violations[:200]:
            t.add_row("[red]error[/]" if v.severity == "error" else "[yellow]warning[/]", v.rule, v.node, v.message)
        console.print(t)
        if len(rep.violations) > 200:
            console.print(f"... {len(rep.violations) - 200} more (see --json)")
    verdict = "[green]PASS[/]" if rep.ok else f"[red]FAIL[/] ({len(rep.errors)} violation(s): " \
                                                f"{', '.join(sorted(rep.rules_failed()))})"
    console.print(f"lint: {verdict}")
