"""Which student steps drive CAD's updates? Per student timestep: the unweighted KD error of the initial student
(= the quantized teacher, so the error is the 2-steps-vs-1-step gap), the norm of its gradient, and each step's
share of the gradient under the two weightings of Eq. (8): max(SNR, 1) (the paper's, CadConfig default) and SNR
(= the MSE of the implied eps, what an eps-predicting UNet was trained on).

Why: in GPU run 3 every distilled student ended as far from the data as its 100-step teacher (FID 40 at W4A8),
while the same teacher sampled with 50 steps and no distillation reached 23.6, and the students' fixed-batch KD
loss rose at 3 of 4 logged steps. An x-space error at t near T is the eps error times (sigma_t / alpha_t)^2 ~ 1e4,
so with max(SNR, 1) a few noisiest steps can own the gradient (and Adam's second moments).

With --train N it then distills the teacher for N updates under each weighting (no calibration term, batch 16,
lr 5e-5 or --lr, the dataset's images) and records the per-step KD loss, the 50-step sample gaps before and after,
and how far the student moved (changed integers, largest activation-step change): with --lr 5e-7 the fixed-batch
KD loss at t = 999 still moves by tens of percent while no integer changes (it does not track the model).

    python -m research.cad_weighting_check --quantized W/jobs/quant-w4a8-pq --data /usr/share/datasets/fashion-mnist \
        --out docs/results/cad_weighting_w4a8.json [--train 300 --train-out docs/results/cad_weighting_cpu_runs.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


from pqcad_export.atomic import atomic_write_json


def main(argv=None) -> int:
    from pqcad_export.distill.cad import CdcBank, cad_trainer, images_from_dataset, kd_weight
    from pqcad_export.distill.config import CadConfig
    from pqcad_export.quantize import load_quantized

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantized", required=True, help="a 100-step quantized model directory (the CAD teacher)")
    ap.add_argument("--data", required=True, help="training images (pqcad_export.data.load_images path)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--train", type=int, default=0, metavar="N", help="also distill N updates per weighting")
    ap.add_argument("--train-out", default=None, help="JSON of the --train runs")
    ap.add_argument("--workdir", default="/tmp/cad_weighting", help="students of the --train runs")
    ap.add_argument("--lr", type=float, default=5e-5,
                    help="--train runs: Adam lr of the grid weights and FP params (activation steps: 2x, as the "
                         "paper preset's 5e-5 / 1e-4)")
    ap.add_argument("--kd-teacher", default="quantized", choices=["quantized", "fp"],
                    help="--train runs: KD target from the quantized teacher (paper) or the FP model")
    ap.add_argument("--weightings", nargs="+", default=["truncated_snr", "snr"], choices=["truncated_snr", "snr"],
                    help="--train runs: KD weightings to distill under")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    q = load_quantized(a.quantized, "cpu")
    imgs = images_from_dataset(a.data, 512, q.sample_shape)
    cfg = CadConfig.preset("paper", calib_loss="none", lam=0.0, batch_size=a.batch)
    tr = cad_trainer(q.unet, q.scheduler_config, CdcBank({}), cfg, imgs, torch.device("cpu"))
    params = [p for g in tr.opt.param_groups for p in g["params"]]
    rows = []
    for i, t in enumerate(int(x) for x in tr.grid):
        gen = torch.Generator().manual_seed(a.seed * 1009 + i)
        kb = tr.batch(gen, a.batch, t)
        w = kd_weight(tr.sched, t, cfg.kd_weighting)
        loss, _, _ = tr.losses(kb, gen)
        grads = torch.autograd.grad(loss / w, params, allow_unused=True)
        gnorm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))
        snr = kd_weight(tr.sched, t, "snr")
        rows.append({"t": t, "snr": snr, "x_err": float(loss.detach()) / w, "grad_norm_x": gnorm})
        print(f"t={t:4d} SNR={snr:10.4g} x-space err={rows[-1]['x_err']:10.4g} |grad|={gnorm:10.4g}", flush=True)
    res = {"quantized": str(a.quantized), "batch": a.batch, "kd_target": cfg.kd_target, "steps": rows}
    for name, wfn in (("truncated_snr", lambda r: max(r["snr"], 1.0)), ("snr", lambda r: r["snr"])):
        tot = sum(wfn(r) * r["grad_norm_x"] for r in rows)
        share = {r["t"]: wfn(r) * r["grad_norm_x"] / tot for r in rows}
        top = sorted(share.items(), key=lambda kv: -kv[1])[:5]
        noisy = sum(v for t, v in share.items() if t >= 900)
        res[name] = {"share_by_t": share, "top5": top, "share_t_ge_900": noisy}
        print(f"{name}: top-5 steps by gradient share {[(t, round(v, 3)) for t, v in top]}; "
              f"steps t >= 900 (5 of {len(rows)}) hold {noisy:.1%}")
    if a.out:
        atomic_write_json(a.out, res)
    if a.train:
        runs = {w: _short_run(a, w) for w in a.weightings}
        if a.train_out:
            atomic_write_json(a.train_out, runs, indent=1)
    return 0


def _short_run(a, weighting: str) -> dict:
    """N distillation updates of the teacher under one KD weighting; the log's before/after readings."""
    from pqcad_export.distill import CadConfig, run_distill

    cfg = CadConfig.preset("quick", iters=a.train, batch_size=16, lr=a.lr, lr_act=2 * a.lr, gap_samples=32,
                           eval_images=16, calib_loss="none", kd_weighting=weighting, kd_teacher=a.kd_teacher,
                           dataset=a.data, n_train_images=2000, checkpoint_every=max(a.train, 1), seed=a.seed)
    out = Path(a.workdir) / weighting
    log = run_distill(a.quantized, None, cfg, out, quiet=True).log
    run = {k: log[k] for k in ("config", "eval_before", "eval_after", "sample_gap_mse", "seconds", "training_images")}
    run["train_loss_every_10"] = [round(h["loss"], 5) for h in log["history"] if h["kind"] == "train"]
    run["student_moved"] = _moved(a.quantized, out)
    print(f"{weighting}: KD per step {log['eval_before']['kd_per_t']} -> {log['eval_after']['kd_per_t']}; "
          f"sample gap {log['sample_gap_mse']['before']} -> {log['sample_gap_mse']['after']}", flush=True)
    return run


def _moved(teacher_dir, student_dir) -> dict:
    """How far the student is from its teacher: integers that changed, largest relative activation-step change."""
    from pqcad_export.quantize import load_quantized

    t = load_quantized(teacher_dir, "cpu").unet.state_dict()
    s = load_quantized(student_dir, "cpu").unet.state_dict()
    ints = sum(int((t[k] != s[k]).sum()) for k in t if k.endswith("w_int"))
    total = sum(t[k].numel() for k in t if k.endswith("w_int"))
    steps = [float(((s[k] - t[k]).abs() / t[k].abs().clamp_min(1e-12)).max()) for k in t if k.endswith(".scale")]
    return {"integers_changed": ints, "integers": total, "max_rel_act_step_change": max(steps, default=0.0)}


if __name__ == "__main__":
    sys.exit(main())
