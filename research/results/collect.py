"""`collect`: results.json (every finished job's record, the plan, versions) and the figures of a work dir."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pqcad_export.atomic import atomic_write_json

def cmd_collect(args) -> int:
    """results.json (every done.json, the plan, versions) + figures into --out."""
    import numpy as np

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = json.loads((work / "plan.json").read_text())
    res: dict[str, Any] = {"plan": plan["plan"], "jobs": {}}
    # every job of the work dir, not only this run's selection (an --only run would drop earlier rows)
    names = list(plan["jobs"]) + sorted(d.name for d in (work / "jobs").glob("*") if d.name not in plan["jobs"])
    for n in names:
        d = work / "jobs" / n
        if (d / "done.json").is_file():
            res["jobs"][n] = {"status": "done", **json.loads((d / "done.json").read_text())}
        elif (d / "failed.json").is_file():
            res["jobs"][n] = {"status": "failed", **json.loads((d / "failed.json").read_text())}
    try:
        import torch

        res["versions"] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    except Exception:
        pass
    atomic_write_json(out / "results.json", res)
    # figures: transition curve of W4A8 PQ, and the first 12 samples of the headline rows that were sampled
    curve = work / "jobs" / "quant-w4a8-pq" / "transition_curve.png"
    if curve.is_file():
        (out / "transition_curve_w4a8.png").write_bytes(curve.read_bytes())
    headline = ("fp32-100", "fp32-50", "quant-w8a8-pq", "cad-w8a8-pq-em", "cad-w8a8-pq-em-fpkd",
                "quant-w4a8-direct", "quant-w4a8-pq", "quant-w4a8-pq-50steps", "cad-w4a8-pq-none",
                "cad-w4a8-pq-em", "cad-w4a8-pq-em-fpkd")
    # then the other students this work dir sampled (an ablation-only run 8 had only the FP32 row in its grid)
    others = sorted(p.name[len("eval-"):] for p in (work / "jobs").glob("eval-cad-*"))
    rows = [r for r in dict.fromkeys([*headline, *others])
            if (work / "jobs" / f"eval-{r}" / "images.npy").is_file()][:16]
    if rows:
        from pqcad_export.metrics import save_grid

        imgs = np.concatenate([np.load(work / "jobs" / f"eval-{r}" / "images.npy", mmap_mode="r")[:12]
                               for r in rows])
        save_grid(imgs, out / "samples_rows.png", nrow=12)
        atomic_write_json(out / "samples_rows.json", {"rows_top_to_bottom": rows})
    # each quantization's and CAD student's own log (a CAD dir also holds its teacher's quant_log.json)
    own_log = {"quant-": "quant_log.json", "cad-": "cad_log.json"}
    for n in names:
        log = next((work / "jobs" / n / f for pre, f in own_log.items() if n.startswith(pre)), None)
        if log is not None and log.is_file():
            (out / f"{n}.log.json").write_bytes(log.read_bytes())
    print(json.dumps({n: j.get("status") for n, j in res["jobs"].items()}))
    return 0

