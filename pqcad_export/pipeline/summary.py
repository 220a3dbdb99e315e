"""The table a build / compare ends with: stages, the compare numbers and the artifact paths."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if summary.get("stages"):
        t = Table(title=f"run {summary['run']}  ({summary.get('seconds', '?')} s)")
        for col in ("stage", "status", "seconds", "artifacts"):
            t.add_column(col)
        for r in summary["stages"]:
            t.add_row(r["stage"], str(r["status"]), _fmt(r.get("seconds"), 1), r["path"])
        con.print(t)
    rep = summary.get("compare")
    if rep:
        t = Table(title=f"compare vs FP32 {rep['reference']['steps']}-step  ({rep['samples']} samples, "
                        f"{rep['device']})")
        for col in ("model", "backend", "steps", "ms/UNet call", "ms/image", "speedup", "FID", "FID→FP32",
                    "bytes", "status"):
            t.add_column(col)
        for r in [rep["reference"], *rep["candidates"]]:
            t.add_row(r["name"], r["backend"], str(r["steps"]), _fmt(r["unet_ms_per_call"]),
                      _fmt(r["ms_per_image"]), _fmt(r.get("speedup_vs_reference")) + ("×" if r.get(
                          "speedup_vs_reference") else ""), _fmt(r["fid"]), _fmt(r["fid_to_fp32"]),
                      _fmt(r["model_bytes"]), r.get("status", "reference"))
        con.print(t)
        for n in rep.get("notes", []):
            con.print(f"[dim]note: {n}[/dim]")
        if summary.get("report_dir"):
            con.print(f"report: {summary['report_dir']}/compare.json, compare.png, samples.png")
