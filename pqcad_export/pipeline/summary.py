"""The summary a build / compare ends with: stages, then one block per model (FP32 teacher, candidates, FP
references), then gates and notes. Laid out for an 80-column terminal: long values wrap, nothing is cut off.
"""

from __future__ import annotations

from typing import Any, Optional

SEP = "  "


def _num(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _bytes(v: Optional[int]) -> str:
    if v is None:
        return "—"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v} B"


def _kid(v: Any, std: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.4f}" + (f"±{std:.4f}" if isinstance(std, (int, float)) else "")


def _speedup(v: Any, ref: Any) -> str:
    """Against the fastest FP reference (compare.json `speedup_reference`), which is rarely PyTorch FP32."""
    return f" ({v:.2f}× {ref or 'FP'}'s speed)" if isinstance(v, (int, float)) and v else ""


def entry_lines(kind: str, e: dict[str, Any]) -> tuple[str, str, list[tuple[str, str]]]:
    """(name, what it is, [(label, value)]) of one compare.json entry."""
    what = f"{kind}; {e.get('backend', '?')}, {e.get('steps', '?')} steps"
    if e.get("status") and kind == "candidate":
        what += f", {e['status']}"
    rows = [("precision", str(e.get("precision", "—")))]
    ref = e.get("speedup_reference")
    speed = (f"{_num(e.get('unet_ms_per_call'))} ms/UNet call{_speedup(e.get('unet_speedup_vs_reference'), ref)}"
             f"{SEP}{_num(e.get('ms_per_image'))} ms/image{_speedup(e.get('speedup_vs_reference'), ref)}")
    rows.append(("speed", speed))
    rows.append(("size", _bytes(e.get("model_bytes"))
                 + (f"{SEP}int weights {_bytes(e['int_weight_bytes'])}" if e.get("int_weight_bytes") else "")))
    q = [f"FID {_num(e.get('fid'))}", f"KID {_kid(e.get('kid'), e.get('kid_std'))}"]
    rows.append(("vs data", SEP.join(q)))
    if kind != "reference":
        q = [f"FID {_num(e.get('fid_to_fp32'))}", f"KID {_kid(e.get('kid_to_fp32'), e.get('kid_to_fp32_std'))}",
             f"PSNR {_num(e.get('psnr_to_fp32'))} dB", f"SSIM {_num(e.get('ssim_to_fp32'), 3)}"]
        rows.append(("vs FP32", SEP.join(q)))
    return str(e.get("name", "?")), what, rows


def print_compare(con, rep: dict[str, Any], report_dir: Optional[str] = None) -> None:
    from rich.table import Table
    from rich.text import Text

    con.print(Text(f"compare vs FP32 {rep['reference'].get('steps')}-step, {rep.get('samples')} samples, "
                   f"{rep.get('device')}", style="bold"))
    from .report_png import report_entries

    labels = {"teacher": "reference", "candidate": "candidate", "fp-reference": "FP reference"}
    blocks = [(labels[kind], e) for kind, e in report_entries(rep)]
    for kind, e in blocks:
        name, what, rows = entry_lines(kind, e)
        head = Text(name, style="bold cyan")
        head.append(f"  ({what})", style="dim")
        con.print(head)
        grid = Table.grid(padding=(0, 1))
        grid.add_column(min_width=11, style="dim", no_wrap=True)
        grid.add_column(overflow="fold")
        for label, value in rows:
            grid.add_row(f"  {label}", value)
        con.print(grid)
    for g in rep.get("gates") or []:
        ok = g.get("passed")
        v = g.get("value")
        con.print(Text(f"gate {g['gate']}: {'passed' if ok else 'FAILED'} "
                       f"({g.get('candidate')}: {'null' if v is None else format(v, '.4g')})",
                       style="green" if ok else "bold red"))
    for n in rep.get("notes", []):
        con.print(Text(f"note: {n}", style="dim"))
    if report_dir:
        con.print(Text(f"report: {report_dir}/compare.json, compare.png, samples.png"))


def print_summary(summary: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    if summary.get("stages"):
        t = Table(title=f"run {summary['run']}  ({summary.get('seconds', '?')} s)", title_justify="left")
        t.add_column("stage", no_wrap=True)
        t.add_column("status", overflow="fold")
        t.add_column("s", justify="right", no_wrap=True)
        t.add_column("artifacts", overflow="fold")
        for r in summary["stages"]:
            t.add_row(r["stage"], str(r["status"]), _num(r.get("seconds"), 1), r["path"])
        con.print(t)
    rep = summary.get("compare")
    if rep:
        print_compare(con, rep, summary.get("report_dir"))
