"""Quality gates for deployment pipelines: `--gate "METRIC>=X"` / `--gate "METRIC<=X"` on the deliverable.

A gate is checked on the first candidate of compare.json (the run's engine, or the --engine given to compare; the
optional PyTorch student and relaxed engine are diagnostics, not the deliverable). Gates are parsed and their
metric names checked before any work (UsageError, exit 2). After the report is written, each gate and its outcome
is recorded in compare.json (`gates`, `gate_verdict`); a missed gate (or a metric that came out null: a gate never
passes on a number that was not measured) ends the command with GateFailed, exit code 3.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Optional

from ..atomic import atomic_write_json
from ..errors import PqcadError, UsageError

EXIT_GATE_FAILED = 3

# Numeric metrics of a candidate entry in compare.json that a gate may name.
QUALITY_METRICS = ("fid", "fid_to_fp32", "kid", "kid_std", "kid_to_fp32", "kid_to_fp32_std", "psnr_to_fp32",
                   "ssim_to_fp32", "mse_to_fp32")
SPEED_METRICS = ("unet_ms_per_call", "ms_per_image", "speedup_vs_reference", "unet_speedup_vs_reference",
                 "model_bytes", "int_weight_bytes", "steps", "average_act_bits")
GATE_METRICS = QUALITY_METRICS + SPEED_METRICS

_GATE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class Op(str, Enum):
    GE = ">="
    LE = "<="


class GateFailed(PqcadError):
    """A quality gate was missed: the report is written, the command exits 3."""

    exit_code = EXIT_GATE_FAILED


@dataclass(frozen=True)
class Gate:
    metric: str
    op: Op
    threshold: float

    @property
    def text(self) -> str:
        return f"{self.metric}{self.op.value}{self.threshold:g}"

    def passes(self, value: Optional[float]) -> bool:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        return value >= self.threshold if self.op is Op.GE else value <= self.threshold


def parse_gate(text: str) -> Gate:
    """'psnr_to_fp32>=30' -> Gate; anything else is a one-line UsageError naming the accepted form."""
    m = _GATE_RE.match(str(text))
    if not m:
        raise UsageError(f"malformed --gate {text!r}: expected METRIC>=NUMBER or METRIC<=NUMBER, "
                         f"e.g. \"psnr_to_fp32>=30\"")
    metric, op, num = m.groups()
    if metric not in GATE_METRICS:
        raise UsageError(f"--gate {text!r}: unknown metric {metric!r}; one of {', '.join(GATE_METRICS)}")
    value = float(num)
    if not math.isfinite(value):
        raise UsageError(f"--gate {text!r}: the threshold must be a finite number")
    return Gate(metric, Op(op), value)


def parse_gates(texts: Iterable[str], no_fid: bool = False) -> list[Gate]:
    """All --gate values, validated before any work; quality gates with --no-fid could never be met."""
    gates = [parse_gate(t) for t in texts or ()]
    if no_fid:
        bad = [g.text for g in gates if g.metric in QUALITY_METRICS]
        if bad:
            raise UsageError(f"--gate {bad[0]} needs image-quality metrics, which --no-fid skips")
    return gates


def evaluate(report: dict[str, Any], gates: list[Gate]) -> list[dict[str, Any]]:
    """One record per gate, on the report's first candidate."""
    cands = report.get("candidates") or []
    cand = cands[0] if cands else {}
    out = []
    for g in gates:
        value = cand.get(g.metric)
        rec = {"gate": g.text, "metric": g.metric, "op": g.op.value, "threshold": g.threshold,
               "candidate": cand.get("name"), "value": value, "passed": g.passes(value)}
        if value is None:
            rec["reason"] = "not measured (null in compare.json)"
        out.append(rec)
    return out


def verdict(results: list[dict[str, Any]]) -> str:
    failed = [r for r in results if not r["passed"]]
    if not failed:
        return f"quality gate passed: {', '.join(r['gate'] for r in results)}"

    def show(r):
        v = r["value"]
        return f"{r['gate']} (got {'null' if v is None else format(v, '.4g')})"

    return (f"quality gate failed on {failed[0]['candidate']}: {'; '.join(show(r) for r in failed)} "
            f"[{len(failed)} of {len(results)} missed]")


def apply_gates(report_path: Path, gates: list[Gate]) -> Optional[dict[str, Any]]:
    """Evaluate gates on report_path (compare.json), record them in it, return the report (None: no gates)."""
    if not gates:
        return None
    p = Path(report_path)
    if not p.is_file():
        raise GateFailed(f"quality gate failed: no report at {p} to check {', '.join(g.text for g in gates)}")
    try:
        report = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise PqcadError(f"cannot read {p} to check the gates: {exc}") from None
    results = evaluate(report, gates)
    report["gates"] = results
    report["gate_verdict"] = "passed" if all(r["passed"] for r in results) else "failed"
    atomic_write_json(p, report)
    return report


def raise_if_failed(report: Optional[dict[str, Any]]) -> Optional[str]:
    """GateFailed (exit 3) with the one-line verdict when a gate was missed; else the 'passed' line."""
    if not report or not report.get("gates"):
        return None
    line = verdict(report["gates"])
    if report.get("gate_verdict") != "passed":
        raise GateFailed(line)
    return line
