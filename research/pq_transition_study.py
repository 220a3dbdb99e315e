"""Does a longer tau-bit stage help PQ? Block perturbation of direct reconstruction vs PQ with its detector vs PQ
with the transition forced at a fixed fraction of the same weight budget (CPU, the built-in teacher).

On the GPU PQ's detector fires within its first readings of every block, so PQ is direct reconstruction after a
short 8-bit warm start (docs/RESULTS.md, "Goals"); this measures whether letting the 8-bit stage run longer, at
the same total budget, lowers the block error the reconstruction minimises.

    python -m research.pq_transition_study --iters 800 --out docs/results/pq_transition_study_800.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from calibration import CalibConfig, run_calibrate
from calibration.storage import open_set
from pqcad_export.model_io import load_model
from pqcad_export.quantize import PQConfig, ReconConfig, quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=160, help="AdaRound iterations per block (quick preset: 160)")
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--force", type=float, nargs="+", default=[0.5],
                    help="fractions of the budget at which the forced variants switch from tau to kappa bits")
    ap.add_argument("--work", default="/tmp/pq_transition_study", help="calibration set goes here")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(None)
    run_calibrate(lm, CalibConfig.preset("quick", with_dc=False), a.work, quiet=True)
    cset = open_set(a.work, "c_qc", expect_fingerprint=lm.fingerprint)
    variants = [("direct", "direct", PQConfig(window=20)), ("pq (detector)", "pq", PQConfig(window=20))]
    variants += [(f"pq forced at {f:g}", "pq", PQConfig(window=20, pi=0.0, force_fraction=f)) for f in a.force]
    res: dict = {"iters": a.iters, "bits": a.bits, "preset": "quick", "rows": {}}
    for name, method, pq in variants:
        t0 = time.time()
        cfg = ReconConfig.preset("quick", iters=a.iters, act_iters=max(40, a.iters // 4), pq=pq, progress=False)
        batches = cset.iter_batches(batch_size=64, shuffle=True, seed=0, keys=["sample", "timestep"])
        log = quantize_model(lm, batches, a.bits, method, cfg).log
        units = log.get("units", [])
        its = [u["transition_iter"] for u in units if u.get("transition_iter") is not None]
        res["rows"][name] = {"geomean_pert": log.get("geomean_pert"),
                             "detector_fired": sum(u.get("transition") == "detector" for u in units),
                             "mean_transition_iter": sum(its) / len(its) if its else None,
                             "seconds": round(time.time() - t0, 1)}
        print(name, res["rows"][name], flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
