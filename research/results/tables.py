"""`tables`: the Markdown tables of docs/RESULTS.md rendered from one or more results.json files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from research.results.plan import BITS, CAD_LOSSES_ABLATION, quant_name

ROW_LABELS = [
    ("fp32-100", "FP32, 100 steps"),
    ("fp32-50", "FP32, 50 DDIM steps (no distillation)"),
    ("cad-fp32", "FP32 Distill-only (the same distillation, no quantization, no C_DC), 50 steps"),
    ("quant-{b}-direct", "direct (Q-Diffusion-style BRECQ + AdaRound/LSQ), 100 steps"),
    ("quant-{b}-bitshrink", "+ bit-shrink, 100 steps"),
    ("quant-{b}-pq", "+ PQ, 100 steps"),
    ("quant-{b}-pq-50steps", "PQ teacher sampled with 50 DDIM steps (no distillation)"),
    ("cad-{b}-pq-none", "PQ + Distill-DM (CAD without calibration loss), 50 steps"),
    ("cad-{b}-pq-none-seed1", "PQ + Distill-DM, second CAD seed"),
    ("cad-{b}-direct-em", "direct + CAD (EM), 50 steps"),
    ("cad-{b}-pq-em", "**PQCAD** (PQ + CAD-EM), 50 steps"),
    ("cad-{b}-pq-em-seed1", "PQCAD, second CAD seed"),
    ("cad-{b}-pq-em-lam10", "PQCAD with lambda = 10, 50 steps"),
    ("cad-{b}-pq-kl", "PQ + CAD-KL, 50 steps"),
    ("cad-{b}-pq-em-fpkd", "PQCAD, KD target from the FP model (--kd-teacher fp), 50 steps"),
]
# issue 21: the sensitivity-driven mixed-precision plan (quantize/plan.py, default budgets) on every row
MP_LABELS = [
    ("fp32-100", "FP32, 100 steps"),
    ("quant-{b}-rtn-mp", "round-to-nearest + MSE scales (nothing learned), 100 steps"),
    ("quant-{b}-direct-mp", "direct (learned), 100 steps"),
    ("quant-{b}-pq-mp", "PQ (learned), 100 steps"),
    ("quant-{b}-pq-mp-50steps", "PQ sampled with 50 DDIM steps (no distillation)"),
    ("cad-{b}-pq-mp-em", "**PQCAD** (PQ + CAD-EM), 50 steps"),
    ("cad-{b}-pq-mp-em-fpkd", "PQCAD, KD target from the FP model (--kd-teacher fp), 50 steps"),
]
ABLATION_LABELS = [
    ("quant-w4a8-pq", "uniform calibration, block reconstruction"),
    ("quant-w4a8-pq-ndtc", "NDTC calibration (PTQ4DM)"),
    ("quant-w4a8-pq-tdac", "TDAC calibration (EDA-DM)"),
    ("quant-w4a8-pq-pcr", "PCR progressive calibration"),
    ("quant-w4a8-pq-fbr", "FBR reconstruction (EDA-DM)"),
    ("cad-w4a8-pq-pcr-em", "PCR teacher + CAD-EM (PQCAD), 50 steps"),
    ("cad-w4a8-pq-pcr-kl", "PCR teacher + CAD-KL, 50 steps"),
]


def _fmt(v, nd=2) -> str:
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _metric_row(label: str, r: Optional[dict]) -> str:
    if not r or r.get("status") != "done":
        why = (r or {}).get("error", "not run")
        return f"| {label} | – | – | – | – | – | {why[:60]} |"
    return (f"| {label} | {_fmt(r.get('fid'))} | {_fmt(r.get('fid_to_fp32'))} | {_fmt(r.get('sfid'))} | "
            f"{_fmt(r.get('precision'), 3)} | {_fmt(r.get('recall'), 3)} | {r.get('steps')} |")


def cmd_tables(args) -> int:
    """Markdown tables (quality rows, CAD-loss ablation, calibration/reconstruction ablation, relaxing) from
    results.json; printed, or written between the RESULTS-TABLES markers of --md."""
    jobs: dict[str, Any] = {}
    for f in args.results:  # later runs override earlier ones, but a job done earlier is not undone by a later gap
        for n, r in json.loads(Path(f).read_text())["jobs"].items():
            if r.get("status") == "done" or n not in jobs:
                jobs[n] = r
    score = lambda m: jobs.get(f"score-{m}")  # noqa: E731
    head = "| model | FID ↓ | FID-to-FP32 ↓ | sFID ↓ | precision ↑ | recall ↑ | steps |\n|---|---|---|---|---|---|---|"
    out = []
    for b in BITS:
        out += [f"\n**{b.upper()}**\n", head]
        out += [_metric_row(lab, score(key.format(b=b))) for key, lab in ROW_LABELS]
    for b in BITS:
        out += [f"\n**{b.upper()} with the mixed-precision plan (--mixed-precision auto, default budgets)**\n", head]
        out += [_metric_row(lab, score(key.format(b=b))) for key, lab in MP_LABELS]
    out += ["\n**CAD calibration loss (W4A8, PQ teacher, 50 steps)**\n", head]
    out += [_metric_row(f"CAD-{loss}", score(f"cad-w4a8-pq-{loss}")) for loss in CAD_LOSSES_ABLATION]
    out += ["\n**Calibration and reconstruction (W4A8 PQ)**\n", head]
    out += [_metric_row(lab, score(key)) for key, lab in ABLATION_LABELS]
    relax = sorted(k[len("score-"):] for k in jobs if k.startswith("score-relax-"))
    if relax:
        out += ["\n**PCR activation relaxing (W4A8 PQCAD student, fp32 activations on the steps nearest x_0)**\n",
                "| relaxed fraction | average activation bits | FID ↓ | FID-to-FP32 ↓ | sFID ↓ |\n|---|---|---|---|---|"]
        base = score("cad-w4a8-pq-em") or {}
        out.append(f"| 0 | 8 | {_fmt(base.get('fid'))} | {_fmt(base.get('fid_to_fp32'))} | {_fmt(base.get('sfid'))} |")
        for m in relax:
            r = score(m) or {}
            out.append(f"| {m.rsplit('-', 1)[-1]} | {_fmt(r.get('average_act_bits'))} | {_fmt(r.get('fid'))} | "
                       f"{_fmt(r.get('fid_to_fp32'))} | {_fmt(r.get('sfid'))} |")
    pert = ["\n**Block perturbation (geometric mean over blocks, same budget)**\n",
            "| bits | direct | bit-shrink | PQ | Δ_Pert PQ vs direct | blocks where PQ's detector fired |",
            "|---|---|---|---|---|---|"]
    for b in BITS:
        g = {m: (jobs.get(quant_name(b, m)) or {}).get("geomean_pert") for m in ("direct", "bitshrink", "pq")}
        d = (1 - g["pq"] / g["direct"]) if g["pq"] and g["direct"] else None
        tr = (jobs.get(quant_name(b, "pq")) or {}).get("transitions") or {}
        fired = sum(1 for t in tr.values() if t.get("how") == "detector")
        pert.append(f"| {b} | {_fmt(g['direct'], 5)} | {_fmt(g['bitshrink'], 5)} | {_fmt(g['pq'], 5)} | "
                    f"{'–' if d is None else f'{100 * d:+.2f} %'} | {fired}/{len(tr)} |")
    text = "\n".join(out + pert) + "\n"
    if args.md:
        md = Path(args.md)
        doc = md.read_text()
        a, b = "<!-- RESULTS-TABLES -->", "<!-- /RESULTS-TABLES -->"
        if a not in doc or b not in doc:
            raise SystemExit(f"{md} has no {a} ... {b} markers")
        doc = doc[:doc.index(a) + len(a)] + "\n" + text + doc[doc.index(b):]
        md.write_text(doc)
    else:
        print(text)
    return 0

