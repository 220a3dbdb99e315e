"""Time block reconstruction on a CIFAR-size UNet (google/ddpm-cifar10-32 architecture, 35.7M params, random
weights built from its config) at W4A8: seconds per block and in total, as JSON.

Needs only torch + diffusers + numpy + safetensors (+ this repository on the path). Example (GPU machine):
    python -m research.time_reconstruction --device cuda --iters 2000 --out /tmp/recon_timing.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


import torch

# google/ddpm-cifar10-32 unet/config.json
CIFAR10_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                      block_out_channels=(128, 256, 256, 256),
                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                      act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
                      downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1,
                      center_input_sample=False, time_embedding_type="positional")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--method", default="direct", choices=["direct", "pq", "bitshrink"])
    ap.add_argument("--iters", type=int, default=2000, help="AdaRound iterations per block")
    ap.add_argument("--act-iters", type=int, default=500, help="LSQ iterations per block")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calib", type=int, default=256, help="calibration inputs")
    ap.add_argument("--ddim-steps", type=int, default=8)
    ap.add_argument("--fisher", action="store_true", help="squared-gradient weighting (Eq. 5)")
    ap.add_argument("--max-units", type=int, default=0, help="stop after this many blocks (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from diffusers import UNet2DModel

    from pqcad_export.model_io import DEFAULT_SCHEDULER_CONFIG, LoadedModel
    from pqcad_export.quantize import ReconConfig, quantize_model
    from pqcad_export.sampling import SamplerConfig, TorchUNet, ddim_sample

    dev = torch.device(a.device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    torch.manual_seed(a.seed)
    unet = UNet2DModel(**CIFAR10_CONFIG).eval().to(dev)
    unet.requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    loaded = LoadedModel(unet=unet, scheduler_config=dict(DEFAULT_SCHEDULER_CONFIG), path=Path("."),
                         fingerprint="random-cifar10-32", class_name="UNet2DModel")

    # random-ish calibration inputs: x_t along a few DDIM steps of the (random) model
    t0 = time.time()
    per_step = max(1, a.calib // a.ddim_steps)
    batches = []

    def on_step(i, t, x, c):
        batches.append({"sample": x[:per_step].clone(), "timestep": t[:per_step].clone()})

    with torch.no_grad():
        ddim_sample(TorchUNet(unet), loaded.scheduler_config, loaded.sample_shape, per_step,
                    SamplerConfig(steps=a.ddim_steps, batch_size=per_step, seed=a.seed), device=dev, on_step=on_step)
    t_calib = time.time() - t0

    cfg = ReconConfig.preset("paper", iters=a.iters, act_iters=a.act_iters, batch_size=a.batch, fisher=a.fisher,
                             max_calib=a.calib, progress=a.progress, seed=a.seed)

    class _Enough(Exception):
        pass

    marks: list[tuple[str, float]] = []

    def stop(i, name):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        marks.append((name, time.time()))
        if a.max_units and i + 1 >= a.max_units:
            raise _Enough

    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    log = None
    try:
        qm = quantize_model(loaded, batches, a.bits, a.method, cfg, dev, on_unit_done=stop)
        log = qm.log
    except _Enough:
        pass
    if dev.type == "cuda":
        torch.cuda.synchronize()
    total = time.time() - t0
    per_block, prev = {}, t0
    for name, t in marks:
        per_block[name] = round(t - prev, 3)
        prev = t
    report = {
        "model": "google/ddpm-cifar10-32 architecture (random weights)", "params": n_params,
        "bits": a.bits, "method": a.method, "iters_per_block": a.iters, "act_iters_per_block": a.act_iters,
        "batch": a.batch, "calib_inputs": sum(b["sample"].shape[0] for b in batches), "fisher": a.fisher,
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "calib_seconds": round(t_calib, 2), "total_seconds": round(total, 2),
        "blocks": len(per_block), "complete": log is not None,
        "seconds_per_block": per_block,
        "max_cuda_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2) if dev.type == "cuda" else None,
        "geomean_pert": log.get("geomean_pert") if log else None,
    }
    if log is None:
        report["note"] = f"stopped after --max-units {a.max_units}; total covers only those blocks"
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
