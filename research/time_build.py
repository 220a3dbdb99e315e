"""Wall time of a whole `pqcad-export build` (calibrate -> PQ -> CAD -> export -> engine -> report) with a stated
iteration budget, for the built-in teacher or a CIFAR-size UNet (google/ddpm-cifar10-32 architecture, 35.7M params,
random weights: the timing does not depend on them). Writes the per-stage seconds and the machine as JSON.

The build is resumable, so a timing can span several device calls of <= 10 minutes while the machine stays warm:
rerun the same command and the finished stages keep the seconds they took (the JSON sums the stages, not the
reruns). Example (GPU machine, ORT CPU engine since it has no TensorRT):
    python -m research.time_build --model cifar10-32 --out /tmp/tb_cifar --device cuda --backend onnxruntime \
        --quant-iters 2000 --act-iters 500 --distill-iters 1000 --json /tmp/tb_cifar.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


import torch


def cifar_model_dir(root: Path, seed: int) -> Path:
    """A diffusers model directory with the google/ddpm-cifar10-32 UNet architecture and seeded random weights."""
    from diffusers import UNet2DModel

    from pqcad_export.model_io import DEFAULT_SCHEDULER_CONFIG, save_model
    from research.time_reconstruction import CIFAR10_CONFIG

    out = root / "model-cifar10-32"
    if not (out / "config.json").is_file():
        torch.manual_seed(seed)
        save_model(UNet2DModel(**CIFAR10_CONFIG), dict(DEFAULT_SCHEDULER_CONFIG), out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="teacher", help="teacher (built-in) | cifar10-32 | a diffusers model dir")
    ap.add_argument("--out", required=True, help="run directory (and the CIFAR model dir next to it)")
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--preset", default="paper", choices=["quick", "paper"])
    ap.add_argument("--quant-iters", type=int, default=None, help="AdaRound iterations per block (PQ's budget)")
    ap.add_argument("--act-iters", type=int, default=None, help="LSQ iterations per block")
    ap.add_argument("--distill-iters", type=int, default=None, help="CAD student updates")
    ap.add_argument("--samples", type=int, default=16, help="report stage: images per model (latency only, no FID)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the timing here (also printed)")
    a = ap.parse_args()

    from pqcad_export.pipeline.build import BuildConfig, budget_overrides, run_build

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = None if a.model == "teacher" else str(cifar_model_dir(out.parent, a.seed)) if a.model == "cifar10-32" \
        else a.model
    cfg = BuildConfig.flat(bits=a.bits, model=model, out=str(out / "run"), preset=a.preset, backend=a.backend,
                           device=a.device, seed=a.seed, samples=a.samples, no_fid=True, quiet=True,
                           overrides=budget_overrides(a.quant_iters, a.act_iters, a.distill_iters))
    t0 = time.time()
    summary = run_build(cfg)
    stages = {r["stage"]: r["seconds"] for r in summary["stages"]}
    dev = torch.device(a.device)
    run_json = json.loads((out / "run" / "run.json").read_text())
    from pqcad_export.model_io import load_model

    n_params = sum(p.numel() for p in load_model(model, "cpu").unet.parameters())
    report = {
        "model": a.model, "params": n_params, "bits": a.bits, "preset": a.preset, "backend": a.backend,
        "budget": {"quant_iters_per_block": a.quant_iters, "act_iters_per_block": a.act_iters,
                   "distill_iters": a.distill_iters, "note": "None = the preset's value"},
        "config": run_json.get("config"),
        "stage_seconds": stages, "build_seconds": round(sum(v or 0 for v in stages.values()), 1),
        "this_call_seconds": round(time.time() - t0, 1),
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    from pqcad_export.errors import PqcadError

    try:
        sys.exit(main())
    except PqcadError as exc:  # one line, like the CLI
        sys.exit(f"error: {exc}")
