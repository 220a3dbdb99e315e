#!/usr/bin/env python3
"""Train the built-in teacher: a quarter-width google/ddpm-cifar10-32 UNet2DModel on Fashion-MNIST (padded to 32x32).

DDPM epsilon objective, 1000 training timesteps, the linear beta schedule of google/ddpm-cifar10-32
(1e-4 .. 0.02), EMA weights, bf16 autocast on GPU. Checkpoints (model + EMA + optimiser + RNG) are written atomically
every --ckpt-every steps and when --time-budget runs out, so training can span several GPU runs of <= 10 minutes:

    python tools/train_teacher.py --ckpt runs/teacher/ckpt.pt --time-budget 540     # run 1
    python tools/train_teacher.py --ckpt runs/teacher/ckpt.pt --time-budget 540     # run 2 resumes
    python tools/train_teacher.py --ckpt runs/teacher/ckpt.pt --export DIR --steps 0  # EMA weights -> diffusers dir

Dependencies: torch, diffusers, numpy (rich optional) so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

from pqcad_export.data import load_images  # noqa: E402
from pqcad_export.model_io import DEFAULT_SCHEDULER_CONFIG, save_model  # noqa: E402

# google/ddpm-cifar10-32 at quarter width: (128,256,256,256) -> (32,64,64,64), attention at 16x16. 2.24M params.
ARCH = dict(sample_size=32, in_channels=1, out_channels=1, layers_per_block=2,
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=32, norm_eps=1e-6, attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1,
            resnet_time_scale_shift="default", downsample_padding=0)


def build_unet(width: int = 32) -> UNet2DModel:
    arch = dict(ARCH)
    arch["block_out_channels"] = (width, 2 * width, 2 * width, 2 * width)
    return UNet2DModel(**arch)


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Progress:
    """rich progress bar when available (not on the bare GPU image), plain periodic prints otherwise."""

    def __init__(self, total: int, start: int):
        self.total, self.last_print = total, 0.0
        try:
            from rich.progress import BarColumn, Progress as RP, TextColumn, TimeRemainingColumn
            self.bar = RP(TextColumn("teacher"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()
        except ImportError:
            self.bar = None

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif time.time() - self.last_print > 15:
            print(f"step {step}/{self.total} {info}", flush=True)
            self.last_print = time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="Fashion-MNIST idx dir, an idx3 file or an image folder "
                    "(default: the Debian dataset-fashion-mnist files)")
    ap.add_argument("--ckpt", default="runs/teacher/ckpt.pt", help="checkpoint file (resumed when it exists)")
    ap.add_argument("--steps", type=int, default=40000, help="total optimiser steps")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--ema", type=float, default=0.9999, help="EMA decay (with the usual (1+n)/(10+n) warm-up)")
    ap.add_argument("--width", type=int, default=32, help="base channels (32 -> 2.24M params)")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; checkpoint and stop when exceeded")
    ap.add_argument("--ckpt-every", type=int, default=2000)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--export", default=None, help="write the EMA teacher in diffusers layout here and exit")
    ap.add_argument("--init-only", action="store_true", help="with --export: write an untrained model")
    ap.add_argument("--log-json", default=None, help="append a JSON line with progress stats at the end")
    args = ap.parse_args()

    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    ckpt_path = Path(args.ckpt)
    model = build_unet(args.width).to(dev)
    ema = build_unet(args.width).to(dev)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, seconds_total = 0, 0.0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, seconds_total = ck["step"], ck.get("seconds", 0.0)
        torch.set_rng_state(ck["rng_cpu"].cpu())
        if dev.type == "cuda" and ck.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ck["rng_cuda"].cpu())
        print(f"resumed {ckpt_path} at step {step} ({seconds_total:.0f}s trained so far)", flush=True)

    if args.export:
        if not ckpt_path.is_file() and not args.init_only:
            sys.exit(f"error: no checkpoint at {ckpt_path} (use --init-only for an untrained model)")
        ema.float().cpu().eval()
        save_model(ema, DEFAULT_SCHEDULER_CONFIG, args.export)
        n = sum(p.numel() for p in ema.parameters())
        print(f"exported EMA teacher ({n} params, step {step}) to {args.export}")
        return

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    acp = sched.alphas_cumprod.to(dev)
    data = torch.from_numpy(load_images(args.data, size=32, channels=1)).to(dev)
    data = data.float().div(127.5).sub(1.0)  # [N,1,32,32] in [-1,1]
    n_data = data.shape[0]
    fwd = torch.compile(model) if args.compile else model
    use_amp = dev.type == "cuda"
    prog = Progress(args.steps, step)
    t_start, imgs, loss_ema = time.time(), 0, None
    stop_reason = "steps"
    model.train()
    while step < args.steps:
        idx = torch.randint(0, n_data, (args.batch_size,), device=dev)
        x0 = data[idx]
        flip = torch.rand(args.batch_size, device=dev) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, 1000, (args.batch_size,), device=dev)
        noise = torch.randn_like(x0)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            try:
                pred = fwd(xt, t).sample
            except Exception as exc:  # torch.compile can fail on some stacks: fall back to eager, say so
                if fwd is model:
                    raise
                print(f"torch.compile failed ({type(exc).__name__}); continuing eagerly", flush=True)
                fwd = model
                pred = fwd(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.step()
        step += 1
        imgs += args.batch_size
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        if step % 50 == 0:
            lv = loss.item()
            if not math.isfinite(lv):
                sys.exit(f"error: loss became {lv} at step {step}; checkpoint {ckpt_path} left untouched")
            loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
            el = time.time() - t_start
            prog.update(step, f"loss {loss_ema:.4f}  {imgs / max(el, 1e-6):.0f} img/s")
        budget_hit = args.time_budget and time.time() - t_start > args.time_budget
        if step % args.ckpt_every == 0 or step == args.steps or budget_hit:
            atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": step, "seconds": seconds_total + time.time() - t_start, "args": vars(args),
                         "rng_cpu": torch.get_rng_state(),
                         "rng_cuda": torch.cuda.get_rng_state() if dev.type == "cuda" else None}, ckpt_path)
        if budget_hit:
            stop_reason = "time budget"
            break
    prog.close()
    el = time.time() - t_start
    stats = {"step": step, "seconds_this_run": round(el, 1), "seconds_total": round(seconds_total + el, 1),
             "img_per_s": round(imgs / max(el, 1e-6), 1), "loss_ema": loss_ema, "stop": stop_reason,
             "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "args": vars(args)}
    print(json.dumps(stats), flush=True)
    if args.log_json:
        with open(args.log_json, "a") as fh:
            fh.write(json.dumps(stats) + "\n")


if __name__ == "__main__":
    main()
