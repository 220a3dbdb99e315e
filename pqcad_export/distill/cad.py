"""Calibration-Assisted Distillation (arXiv 2506.16776, Alg. 4): a 50-step quantized student from the 100-step
quantized teacher, trained with Eq. (8):

    L = w(lambda_t) * ||x_tilde - x_hat_theta(z_t)||^2  +  lambda * D(C_DC at step t, student output at step t)

* KD term (progressive distillation, Salimans & Ho 2022 Alg. 2): each update draws one student step t uniformly,
  a batch of training images x (data-free by default: samples of the FP model), z_t = alpha_t x + sigma_t eps;
  x_tilde is the target from two DDIM steps of the *frozen quantized teacher* (targets.py); w = max(SNR, 1);
  the squared error is a per-element mean. Default error (kd_target="sampler"): the student's real DDIM step
  t -> t'' (x0 clipped as the sampler clips it) against the teacher's z_t'', divided by
  c_t = alpha_t'' - (sigma_t''/sigma_t) alpha_t -- identical to x_hat - x_tilde wherever nothing is clipped, but
  bounded where the teacher's clipped steps make x_tilde explode (|x_tilde| ~ 300 at t=999 for the built-in
  teacher). kd_target="x" is Eq. (8) verbatim; with an eps-predicting UNet it wrecked the student in our quick
  runs (50-step sample MSE to the teacher's 100-step samples 0.056 -> 0.43), so it is opt-in.
* Calibration term: the C_DC rows collected at the same student step t (z_t from stochastic FP trajectories and
  what the FP model predicts there) go through the student in the same forward pass; D (losses.py, EM by
  default) compares the student's x0-prediction (clipped exactly as the DDIM sampler clips it) with the FP
  model's `x0_pred` (cdc_space="x0"; "eps" compares raw outputs with `model_output`). This is the term that lets
  the student match the FP model rather than the quantized teacher's errors. Steps without C_DC rows get only
  the KD term (counted in the log).

Determinism / resume: every random draw of update i comes from a generator seeded with (seed, i), and the
student, Adam state and iteration are checkpointed atomically every `checkpoint_every` updates, so an
interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one (same device/threads).
The student runs in eval mode (no dropout / QDrop noise) while its parameters are trained.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ..atomic import atomic_write, atomic_write_json
from ..errors import PqcadError
from ..sampling import TorchUNet
from .config import CadConfig
from .losses import calibration_loss
from .student import freeze_student, prepare_student, trainable_groups
from .targets import Schedule, distillation_target, student_grid

CHECKPOINT = "cad_checkpoint.pt"
LOG = "cad_log.json"
TRAIN_IMAGES = "cad_train_images.safetensors"
FP_GIVEN = "fp model (given)"  # training-image source (and cache key part) of an FP module passed in


# ---------------------------------------------------------------------------------------------------------------
# C_DC
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CdcBank:
    """C_DC rows grouped by timestep: {t: {"sample", "x0_pred", "model_output"[, "encoder_hidden_states"]}}."""

    by_t: dict[int, dict[str, torch.Tensor]]
    fingerprint: Optional[str] = None
    ignored_rows: int = 0

    def rows(self, t: int) -> Optional[dict[str, torch.Tensor]]:
        return self.by_t.get(int(t))

    @property
    def count(self) -> int:
        return sum(int(v["sample"].shape[0]) for v in self.by_t.values())


CdcSource = Union[str, Path, "CdcBank", Mapping[str, torch.Tensor], Iterable[Mapping[str, torch.Tensor]], None]


def load_cdc(source: CdcSource, student_timesteps: Optional[torch.Tensor] = None,
             expect_fingerprint: Optional[str] = None) -> CdcBank:
    """C_DC from a calibration dir / set dir (calibration.storage), a dict of row tensors, or an iterable of dict
    batches; rows whose timestep is not on the student grid are dropped (counted)."""
    if isinstance(source, CdcBank):
        return source
    fp = None
    if source is None:
        return CdcBank({})
    if isinstance(source, (str, Path)):
        from calibration.storage import open_set

        s = open_set(source, "c_dc", expect_fingerprint=expect_fingerprint)
        rows, fp = s.load_all(), s.fingerprint
    elif isinstance(source, Mapping):
        rows = dict(source)
    else:
        parts = [dict(b) for b in source]
        if not parts:
            raise PqcadError("C_DC is empty")
        rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    for k in ("sample", "timestep"):
        if k not in rows:
            raise PqcadError(f"C_DC rows have no '{k}' field")
    keep = ("sample", "x0_pred", "model_output", "encoder_hidden_states")
    t_all = rows["timestep"].long().reshape(-1)
    grid = None if student_timesteps is None else {int(t) for t in student_timesteps}
    by_t: dict[int, dict[str, torch.Tensor]] = {}
    ignored = 0
    for t in sorted(set(t_all.tolist())):
        if grid is not None and t not in grid:
            ignored += int((t_all == t).sum())
            continue
        m = t_all == t
        by_t[t] = {k: rows[k][m].float() for k in keep if k in rows}
    if rows["sample"].shape[0] and not by_t:
        raise PqcadError("no C_DC row lies on the student's timestep grid (collected with another schedule?)")
    return CdcBank(by_t, fp, ignored)


# ---------------------------------------------------------------------------------------------------------------
# training images
# ---------------------------------------------------------------------------------------------------------------
def images_from_dataset(path: str, n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """First n images of a dataset as float [-1, 1] NCHW (pqcad_export.data.load_images)."""
    from ..data import load_images

    arr = load_images(path, size=shape[1], channels=shape[0])[:n]
    return torch.from_numpy(arr.copy()).float() / 127.5 - 1.0


def images_from_model(unet_fn: Callable, scheduler_config: dict[str, Any], shape: tuple[int, int, int], n: int,
                      steps: int, seed: int, device: Union[str, torch.device], quiet: bool = True,
                      cond=None) -> torch.Tensor:
    """Data-free training images: n samples of a model with the DDIM sampler (seeded); image i is drawn with
    conditioning row i (mod N) of `cond`, the row CAD pairs it with."""
    from ..metrics._progress import Progress
    from ..sampling import SamplerConfig, ddim_sample

    with Progress(n, f"CAD: sampling {n} training images ({steps} steps)", not quiet) as bar:
        return ddim_sample(unet_fn, scheduler_config, shape, n, SamplerConfig(steps=steps, batch_size=min(n, 32),
                                                                              seed=seed),
                           device=device, progress=bar.advance, cond=None if cond is None else cond.rows(n))


# ---------------------------------------------------------------------------------------------------------------
# atomic files
# ---------------------------------------------------------------------------------------------------------------
def save_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, sort_keys=False)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CadResult:
    student: nn.Module                       # frozen: weights back on the integer grid
    log: dict[str, Any] = field(default_factory=dict)


@dataclass
class KdBatch:
    """One KD batch at student timestep t: z_t, the target x_tilde and the teacher's two-step z_t'' at t''."""

    t: int
    z: torch.Tensor
    x_tilde: torch.Tensor
    z2: torch.Tensor
    t2: torch.Tensor
    c: Optional[torch.Tensor] = None   # encoder_hidden_states of the images (conditional UNets)


def kd_weight(sched: Schedule, t: int, weighting: str) -> float:
    """w(lambda_t) of Eq. (8): "truncated_snr" = max(SNR, 1); "snr" = SNR (x-space error x SNR = eps-space MSE)."""
    tt = torch.tensor([int(t)])
    if weighting == "truncated_snr":
        return float(sched.truncated_snr_weight(tt)[0])
    return float(sched.snr(tt)[0])


def _iter_generator(seed: int, it: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(it) * 7_919 + 12_345) % (2 ** 63 - 1))


class _Trainer:
    def __init__(self, teacher: nn.Module, scheduler_config: dict[str, Any], cdc: CdcBank, cfg: CadConfig,
                 images: torch.Tensor, device: torch.device, kd_unet: Optional[nn.Module] = None,
                 student_bits: Optional[int] = 8, cond=None):
        from ..model_io import student_scheduler_config

        self.cfg, self.device, self.cond = cfg, device, cond
        self.sched = Schedule.from_config(scheduler_config)
        self.scheduler_config = scheduler_config
        self.student_scheduler_config = student_scheduler_config(scheduler_config, cfg.teacher_steps)
        _, self.grid = student_grid(scheduler_config, cfg.teacher_steps)
        self.teacher = teacher.to(device).eval()
        self.teacher.requires_grad_(False)
        self.teacher_fn = TorchUNet(self.teacher)
        # the model whose two steps are the KD target: the quantized teacher (Alg. 4) or, kd_teacher=fp, the FP one
        self.kd_fn = self.teacher_fn
        if kd_unet is not None:
            self.kd_fn = TorchUNet(kd_unet.to(device).eval().requires_grad_(False))
        self.student = prepare_student(self.teacher, student_bits).to(device).eval()
        self.student_fn = TorchUNet(self.student)
        self.groups = trainable_groups(self.student, cfg.lr, cfg.lr_act, cfg.train_fp_params, cfg.train_act_scales)
        for g in self.groups:
            g["base_lr"] = g["lr"]
        self.opt = torch.optim.Adam(self.groups)
        self.cdc = cdc
        self.images = images.float()
        self.loss_gen = torch.Generator()
        self.calib = calibration_loss(cfg.calib_loss, n_projections=cfg.swd_projections, generator=self.loss_gen)

    # one forward pass of the student on the KD batch + the C_DC rows of the same step
    def losses(self, kb: "KdBatch", gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, sched, dev = self.cfg, self.sched, self.device
        t, z, x_tilde = kb.t, kb.z, kb.x_tilde
        rows = self.cdc.rows(t) if cfg.lam > 0 and cfg.calib_loss != "none" else None
        n_kd = z.shape[0]
        inp, cin = z, kb.c
        if rows is not None:
            k = rows["sample"].shape[0]
            sel = torch.randperm(k, generator=gen)[: cfg.cdc_batch] if k > cfg.cdc_batch else torch.arange(k)
            zc = rows["sample"][sel].to(dev)
            inp = torch.cat([z, zc])
            if cin is not None:
                if "encoder_hidden_states" not in rows:
                    raise PqcadError("C_DC has no 'encoder_hidden_states' field (needed by a conditional UNet)")
                cin = torch.cat([cin, rows["encoder_hidden_states"][sel].to(dev)])
        tt = torch.full((inp.shape[0],), int(t), dtype=torch.long, device=dev)
        out = self.student_fn(inp, tt, cin)
        x_hat, _ = sched.to_x0_eps(out[:n_kd], z, tt[:n_kd])
        w = float(kd_weight(sched, t, cfg.kd_weighting))
        if cfg.kd_target == "x":  # Eq. (8) literally: unclipped x-prediction vs x_tilde
            err = x_tilde - x_hat
        else:  # "sampler": the student's real (clipped) DDIM step t -> t'' vs the teacher's z_t'', rescaled by
            # c_t = alpha_t'' - (sigma_t''/sigma_t) alpha_t so it equals x_hat - x_tilde wherever nothing is clipped
            z2_hat, _ = sched.ddim_step(out[:n_kd], z, tt[:n_kd], kb.t2)
            a, s_ = sched.alpha_sigma(tt[:n_kd], z)
            a2, s2 = sched.alpha_sigma(kb.t2, z)
            err = (z2_hat - kb.z2) / (a2 - (s2 / s_) * a)
        kd = w * err.pow(2).mean()
        if rows is None:
            return kd + 0.0 * out.sum(), kd.detach(), torch.zeros(())
        oc = out[n_kd:]
        if cfg.cdc_space == "x0":
            if "x0_pred" not in rows:
                raise PqcadError("C_DC has no 'x0_pred' field (needed for cdc_space=x0)")
            pred, _ = sched.to_x0_eps(oc, zc, tt[n_kd:])
            if sched.clip_sample:
                pred = pred.clamp(-sched.clip_sample_range, sched.clip_sample_range)
            target = rows["x0_pred"][sel].to(dev)
        else:
            if "model_output" not in rows:
                raise PqcadError("C_DC has no 'model_output' field (needed for cdc_space=eps)")
            pred, target = oc, rows["model_output"][sel].to(dev)
        self.loss_gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        cal = self.calib(pred, target)
        return kd + cfg.lam * cal, kd.detach(), cal.detach()

    def batch(self, gen: torch.Generator, n: int, t: Optional[int] = None) -> "KdBatch":
        if t is None:
            t = int(self.grid[int(torch.randint(0, len(self.grid), (1,), generator=gen))])
        idx = torch.randint(0, self.images.shape[0], (n,), generator=gen)
        noise = torch.randn((n, *self.images.shape[1:]), generator=gen)
        x = self.images[idx].to(self.device)
        tt = torch.full((n,), t, dtype=torch.long, device=self.device)
        z = self.sched.q_sample(x, tt, noise.to(self.device))
        c = None if self.cond is None else self.cond.take(idx).to(self.device)
        x_tilde, z2, t2 = distillation_target(lambda zz, ttt: self.kd_fn(zz, ttt, c), self.sched, z, tt,
                                              self.cfg.teacher_steps)
        return KdBatch(t, z, x_tilde, z2, t2, c)

    def make_eval_set(self) -> list["KdBatch"]:
        """Fixed (t, z_t, x_tilde) batches at `eval_steps` grid points spread from high to low noise."""
        n = len(self.grid)
        k = max(1, min(self.cfg.eval_steps, n))
        picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
        out = []
        for j, s in enumerate(picks):
            g = torch.Generator().manual_seed(int(self.cfg.seed) * 31 + 977 + j)
            out.append(self.batch(g, min(self.cfg.eval_images, max(self.images.shape[0], 1)),
                                  int(self.grid[s])))
        return out

    @torch.no_grad()
    def evaluate(self, eval_set) -> dict[str, Any]:
        """Mean losses over the fixed eval batches, and the KD loss per timestep: with an eps-predicting UNet the
        x-space error of the noisiest step (t = 999: ~100 of a mean of ~25, GPU run 3) dominates the mean, so the
        per-step values are the ones to read."""
        tot = kd_s = cal_s = 0.0
        per_t: dict[str, float] = {}
        for j, kb in enumerate(eval_set):
            g = torch.Generator().manual_seed(int(self.cfg.seed) * 17 + 3 + j)
            loss, kd, cal = self.losses(kb, g)
            tot, kd_s, cal_s = tot + float(loss), kd_s + float(kd), cal_s + float(cal)
            per_t[str(kb.t)] = float(kd)
        m = max(len(eval_set), 1)
        return {"loss": tot / m, "kd": kd_s / m, "calib": cal_s / m, "kd_per_t": per_t}

    def step(self, it: int) -> dict[str, float]:
        cfg = self.cfg
        gen = _iter_generator(cfg.seed, it)
        kb = self.batch(gen, cfg.batch_size)
        t = kb.t
        frac = it / max(cfg.iters, 1)
        for g in self.opt.param_groups:  # (load_state_dict replaces the group dicts: never cache them)
            g["lr"] = g["base_lr"] * ((1.0 - frac) if cfg.lr_decay == "linear" else 1.0)
        self.opt.zero_grad(set_to_none=True)
        loss, kd, cal = self.losses(kb, gen)
        if not torch.isfinite(loss):
            raise PqcadError(f"CAD diverged: loss is {float(loss.detach())} at iteration {it} (t={t}); "
                             f"lower the learning rate or --lambda")
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if cfg.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not torch.isfinite(gn):
                raise PqcadError(f"CAD diverged: non-finite gradient at iteration {it} (t={t})")
        self.opt.step()
        return {"iter": it, "t": t, "loss": float(loss.detach()), "kd": float(kd), "calib": float(cal),
                "has_cdc": bool(self.cdc.rows(t) is not None)}

    @torch.no_grad()
    def sample_gap(self, refs: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        """MSE between the student's 50-step DDIM samples and reference 100-step samples of the same noise."""
        from ..sampling import SamplerConfig, ddim_sample

        seed = int(self.cfg.seed) + 9_001
        shape = tuple(self.images.shape[1:])
        x = ddim_sample(self.student_fn, self.student_scheduler_config, shape, n,
                        SamplerConfig(steps=self.cfg.teacher_steps // 2, batch_size=n, seed=seed), self.device,
                        cond=self._cond_rows(n))
        return {k: float((x - r).pow(2).mean()) for k, r in refs.items()}

    @torch.no_grad()
    def gap_references(self, n: int, fp_unet: Optional[nn.Module]) -> dict[str, torch.Tensor]:
        from ..sampling import SamplerConfig, ddim_sample

        seed = int(self.cfg.seed) + 9_001
        shape = tuple(self.images.shape[1:])
        sc = SamplerConfig(steps=self.cfg.teacher_steps, batch_size=n, seed=seed)
        c = self._cond_rows(n)
        refs = {"teacher_100": ddim_sample(self.teacher_fn, self.scheduler_config, shape, n, sc, self.device, cond=c)}
        if fp_unet is not None:
            refs["fp_100"] = ddim_sample(TorchUNet(fp_unet.to(self.device).eval()), self.scheduler_config, shape, n,
                                         sc, self.device, cond=c)
        return refs

    def _cond_rows(self, n: int) -> Optional[torch.Tensor]:
        return None if self.cond is None else self.cond.rows(n)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state(self, it: int, history: list, extra: dict) -> dict[str, Any]:
        return {"iter": it, "student": self.student.state_dict(), "opt": self.opt.state_dict(),
                "history": history, "extra": extra, "torch_rng": torch.get_rng_state()}

    def load(self, ck: dict[str, Any]) -> None:
        self.student.load_state_dict(ck["student"])
        self.opt.load_state_dict(ck["opt"])
        for g in self.opt.param_groups:  # Adam's load keeps our extra keys, but be explicit
            g.setdefault("base_lr", g["lr"])
        torch.set_rng_state(ck["torch_rng"])



def cad_trainer(teacher: nn.Module, scheduler_config: dict[str, Any], cdc: CdcBank, cfg: CadConfig,
                images: torch.Tensor, device: torch.device) -> _Trainer:
    """CAD's training loop object (KD batches, losses, optimiser) without running it: for studies of the loss."""
    return _Trainer(teacher, scheduler_config, cdc, cfg, images, device)


def _check_kd_teacher(cfg: CadConfig, fp_unet: Optional[nn.Module]) -> None:
    if cfg.kd_teacher == "fp" and fp_unet is None:
        raise PqcadError("--kd-teacher fp needs the FP model the quantized teacher was made from (--model)")


def run_cad(teacher: nn.Module, scheduler_config: dict[str, Any], cdc: CdcSource, cfg: CadConfig,
            images: torch.Tensor, out_dir: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu",
            quiet: bool = True, fingerprint: str = "", on_iter: Optional[Callable[[int], None]] = None,
            fp_unet: Optional[nn.Module] = None, student_bits: Optional[int] = 8, cond=None) -> CadResult:
    """Alg. 4 on an nn.Module teacher (quantized wrappers or plain FP). Returns the frozen student.

    A plain FP teacher's student is put on a `student_bits` round-to-nearest grid, or stays FP with None.

    `images`: float [-1, 1] NCHW training images. `out_dir`: checkpoints (`cad_checkpoint.pt`) and `cad_log.json`;
    a checkpoint of the same configuration found there is resumed. `on_iter(i)` runs after update i (tests use it
    to simulate an interruption). With `cfg.gap_samples > 0` the log gets the MSE between the student's 50-step
    samples and the teacher's (and, given `fp_unet`, the FP model's) 100-step samples of the same noise, before
    (= the teacher sampled with 50 steps) and after distillation.
    """
    from ..metrics._progress import Progress

    cfg.validate()
    device = torch.device(device)
    _, grid = student_grid(scheduler_config, cfg.teacher_steps)
    bank = load_cdc(cdc, grid)
    if images.dim() != 4 or images.shape[0] == 0:
        raise PqcadError(f"CAD needs a non-empty NCHW image batch, got shape {tuple(images.shape)}")
    _check_kd_teacher(cfg, fp_unet)
    tr = _Trainer(teacher, scheduler_config, bank, cfg, images, device,
                  kd_unet=fp_unet if cfg.kd_teacher == "fp" else None, student_bits=student_bits, cond=cond)
    out = Path(out_dir) if out_dir is not None else None
    ident = {"cfg": cfg.to_dict(), "fingerprint": fingerprint, "images": _tensor_digest(images), "cdc": bank.count}
    if cond is not None:  # (unconditional runs keep their old ids: their checkpoints stay resumable)
        ident["cond"] = cond.fingerprint
    run_id = _digest(ident)
    start, history, resumed_from = 0, [], None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ck_path = out / CHECKPOINT
        if ck_path.is_file():
            try:
                ck = torch.load(ck_path, map_location=device, weights_only=False)
            except Exception as exc:  # a torn/corrupt checkpoint cannot happen with atomic writes, but say so
                raise PqcadError(f"unreadable CAD checkpoint {ck_path}: {exc}; delete it to restart") from None
            if ck.get("extra", {}).get("run_id") == run_id:
                tr.load(ck)
                start, history, resumed_from = int(ck["iter"]), list(ck["history"]), int(ck["iter"])
    eval_set = tr.make_eval_set()
    gap: dict[str, Any] = {}
    if cfg.gap_samples > 0:
        refs = tr.gap_references(cfg.gap_samples, fp_unet)
        gap = {"n": cfg.gap_samples, "before": (ck["extra"]["gap_before"] if resumed_from is not None
                                                else tr.sample_gap(refs, cfg.gap_samples))}
    t0 = time.perf_counter()
    before = tr.evaluate(eval_set) if resumed_from is None else (history[0] if history else {})
    if resumed_from is None:
        history = [dict(before, iter=0, kind="eval")]
    from ..interrupts import deferred
    from .checkpoint import checkpoint_interval

    every = checkpoint_interval(cfg)
    desc = "CAD: distilling" + (f" (resumed at update {start} of {cfg.iters})" if start else "")
    # the bar counts this process's updates only, so its rate is a real rate after a resume
    with Progress(cfg.iters - start, desc, not quiet) as bar, deferred() as stop:
        run = {"loss": 0.0, "kd": 0.0, "calib": 0.0, "n": 0}
        if resumed_from is not None:  # the unfinished log window, so the resumed history is the uninterrupted one
            run = dict(ck["extra"].get("window") or run)
        n_no_cdc = int(ck["extra"].get("n_no_cdc", 0)) if resumed_from is not None else 0

        def save(done: int) -> None:
            st = tr.state(done, history, {"run_id": run_id, "n_no_cdc": n_no_cdc, "gap_before": gap.get("before"),
                                          "window": dict(run)})
            atomic_write(out / CHECKPOINT, lambda tmp, st=st: torch.save(st, tmp))

        done = start
        for it in range(start, cfg.iters):
            rec = tr.step(it)
            n_no_cdc += 0 if rec["has_cdc"] else 1
            for k in ("loss", "kd", "calib"):
                run[k] += rec[k]
            run["n"] += 1
            done = it + 1
            if done % cfg.log_every == 0 or done == cfg.iters:
                history.append({"iter": done, "kind": "train", **{k: run[k] / run["n"] for k in
                                                                   ("loss", "kd", "calib")}})
                run = {"loss": 0.0, "kd": 0.0, "calib": 0.0, "n": 0}
            bar.advance(1)
            try:
                if on_iter is not None:
                    on_iter(done)
            except KeyboardInterrupt:  # between two updates: as safe to keep as a deferred signal
                stop.signum = stop.signum or int(signal.SIGINT)
            if out is not None and done < cfg.iters and (done % every == 0 or stop.requested):
                save(done)  # every `every` updates, and on SIGINT/SIGTERM after the update in flight
            stop.raise_if_requested()
    after = tr.evaluate(eval_set)
    history.append(dict(after, iter=cfg.iters, kind="eval"))
    student = freeze_student(tr.student)
    if gap:
        gap["after"] = tr.sample_gap(refs, cfg.gap_samples)
    log = {
        "config": cfg.to_dict(), "iters": cfg.iters, "resumed_from": resumed_from,
        "seconds": round(time.perf_counter() - t0, 2), "eval_before": before, "eval_after": after,
        "history": history, "student_timesteps": [int(t) for t in grid],
        "cdc": {"rows": bank.count, "steps_with_rows": len(bank.by_t), "rows_off_grid": bank.ignored_rows,
                "space": cfg.cdc_space, "loss": cfg.calib_loss, "lambda": cfg.lam},
        "weights": "integers recomputed as round(latent/delta) on the teacher's frozen per-channel grid; "
                   "unchanged latents keep the teacher's learned (AdaRound) integers",
        "updates_without_cdc_rows": n_no_cdc,
        "sample_gap_mse": gap or None,
    }
    if out is not None:
        save_json_atomic(out / LOG, log)
    return CadResult(student, log)


def _tensor_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# the build-pipeline entry point
# ---------------------------------------------------------------------------------------------------------------
def _fp_model_for(quantized, fp_model, device) -> tuple[Optional[nn.Module], str]:
    """The FP model that draws data-free training images: given, or the built-in teacher when the quantized model
    was made from it (same fingerprint); None otherwise."""
    from ..model_io import DEFAULT_MODEL_DIR, fingerprint_dir, load_model

    if isinstance(fp_model, nn.Module):
        return fp_model, FP_GIVEN
    if fp_model is not None and not isinstance(fp_model, (str, Path)):  # a LoadedModel
        return fp_model.unet, f"fp model {getattr(fp_model, 'path', '')}"
    if fp_model is not None:
        lm = load_model(fp_model, device)
        src = quantized.meta.get("source_fingerprint")
        if src and lm.fingerprint != src:
            raise PqcadError(f"--model {fp_model} (fingerprint {lm.fingerprint}) is not the model the quantized "
                             f"teacher was made from ({src})")
        return lm.unet, f"fp model {lm.path}"
    src = quantized.meta.get("source_fingerprint")
    if src and DEFAULT_MODEL_DIR.is_dir() and fingerprint_dir(DEFAULT_MODEL_DIR) == src:
        return load_model(None, device).unet, "fp model (built-in teacher)"
    return None, ""


def training_images(quantized, cfg: CadConfig, out_dir: Path, device, fp: Optional[nn.Module] = None,
                    fp_desc: str = "", quiet: bool = True, cond=None) -> tuple[torch.Tensor, str]:
    """Training images for CAD, cached in out_dir (so a resumed run sees the same ones). `quantized` gives the shape
    and schedule (any model with `sample_shape` and `scheduler_config`, e.g. a LoadedModel, when `fp` is given); it
    draws the images itself only when no FP model and no dataset is known.

    dataset path -> its first n images; otherwise data-free: n samples of the FP model (teacher_steps DDIM steps)
    or, when no FP model is known, of the quantized teacher itself. FP samples do not depend on the quantized
    teacher, so their cache key leaves it out: students of different teachers of one FP model can share the file."""
    from safetensors.torch import load_file, save_file

    shape = quantized.sample_shape
    key = _digest({"dataset": cfg.dataset, "n": cfg.n_train_images, "seed": cfg.seed, "steps": cfg.teacher_steps,
                   "teacher": None if (cfg.dataset or fp is not None) else quantized.meta.get("fingerprint"),
                   "fp": fp_desc, **({"cond": cond.fingerprint} if cond is not None and not cfg.dataset else {})})
    cache = out_dir / TRAIN_IMAGES
    if cache.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), "pt") as fh:
                md = fh.metadata() or {}
            if md.get("key") == key:
                return load_file(str(cache))["images"], md.get("source", "cache")
        except Exception:  # a stale or damaged cache is simply rebuilt
            pass
    if cfg.dataset:
        imgs, source = images_from_dataset(cfg.dataset, cfg.n_train_images, shape), f"dataset {cfg.dataset}"
    else:
        source = fp_desc
        if fp is None:
            fn, source = quantized, "quantized teacher samples (no FP model known; pass --model for FP samples)"
        else:
            fn = TorchUNet(fp.to(device).eval())
        imgs = images_from_model(fn, quantized.scheduler_config, shape, cfg.n_train_images, cfg.teacher_steps,
                                 cfg.seed + 4242, device, quiet, cond)
        source = f"data-free: {cfg.n_train_images} DDIM-{cfg.teacher_steps} samples of the {source}"
    atomic_write(cache, lambda tmp: save_file({"images": imgs.contiguous()}, tmp,
                                               metadata={"key": key, "source": source}))
    return imgs, source


def distill(quantized, cdc: CdcSource, cfg: Optional[CadConfig] = None, out_dir: Union[str, Path] = "student",
            device: Union[str, torch.device] = "cpu", fp_model=None, quiet: bool = True,
            on_iter: Optional[Callable[[int], None]] = None, cond=None):
    """CAD end to end: quantized 100-step teacher (QuantizedModel or its directory) + C_DC (calibration dir,
    set dir, rows dict or iterable of dict batches) -> quantized 50-step student saved in `out_dir` in the
    quantized format (`steps: 50`) with `cad_log.json`; returns the student as a QuantizedModel.

    Resumes from `out_dir/cad_checkpoint.pt` when one of the same configuration is there."""
    from ..quantize import QuantizedModel, load_quantized, save_quantized

    cfg = cfg or CadConfig.preset("quick")
    cfg.validate()
    if isinstance(quantized, (str, Path)):
        quantized = load_quantized(quantized, device)
    if not isinstance(quantized, QuantizedModel):
        raise PqcadError("distill() needs a QuantizedModel or a quantized model directory")
    cond = _conditioning(quantized.unet, quantized.is_conditional, cond)
    if quantized.steps != cfg.teacher_steps:
        raise PqcadError(f"the quantized teacher samples with {quantized.steps} steps, CAD is configured for "
                         f"{cfg.teacher_steps}; distill a 100-step teacher (or set teacher_steps)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quantized.to(device)
    _, grid = student_grid(quantized.scheduler_config, cfg.teacher_steps)
    bank = load_cdc(cdc, grid, expect_fingerprint=quantized.meta.get("source_fingerprint"))
    if bank.count == 0 and cfg.calib_loss != "none" and cfg.lam > 0:
        raise PqcadError("C_DC is empty; collect it with `pqcad-export calibrate` or use --calib-loss none")
    fp, fp_desc = _fp_model_for(quantized, fp_model, device)
    _check_kd_teacher(cfg, fp)  # before drawing training images
    images, source = training_images(quantized, cfg, out, device, fp, fp_desc, quiet, cond)
    res = run_cad(quantized.unet, quantized.scheduler_config, bank, cfg, images, out, device, quiet,
                  fingerprint=str(quantized.meta.get("fingerprint", "")), on_iter=on_iter, fp_unet=fp, cond=cond)
    student = QuantizedModel(unet=res.student, bits=quantized.bits, method=quantized.method,
                             meta=dict(quantized.meta), log=dict(quantized.log))
    from ..model_io import student_scheduler_config

    meta = {"steps": cfg.teacher_steps // 2,
            "scheduler_config": student_scheduler_config(quantized.scheduler_config, cfg.teacher_steps),
            "conditioning": None if cond is None else cond.describe(), "distillation": {
        "method": "cad", "teacher_steps": cfg.teacher_steps, "teacher_fingerprint": quantized.meta.get("fingerprint"),
        "kd_teacher": cfg.kd_teacher, "calib_loss": cfg.calib_loss, "lambda": cfg.lam, "iters": cfg.iters,
        "training_images": source,
        "cdc_fingerprint": bank.fingerprint, "rounding": res.log["weights"],
        "teacher_scheduler_config": quantized.scheduler_config}}
    save_quantized(student, out, meta)
    _finish(out, res.log, training_images=source, student_fingerprint=student.meta.get("fingerprint"))
    return student


def _conditioning(unet: nn.Module, conditional: bool, cond):
    """A conditional UNet's conditioning: the one given, else the labelled default (conditioning.py)."""
    if not conditional:
        return None
    if cond is None:
        from ..conditioning import cross_attention_dim, default_conditioning

        cond = default_conditioning(cross_attention_dim(unet))
    return cond


def _finish(out: Path, log: dict[str, Any], **fields: Any) -> None:
    """The last step of a finished distillation: the final log (with `fields`), then the checkpoint goes."""
    save_json_atomic(out / LOG, {**log, **fields})
    ck = out / CHECKPOINT
    if ck.exists():
        ck.unlink()


DISTILL_ONLY_META = "distillation.json"


def distill_fp(model, cfg: Optional[CadConfig] = None, out_dir: Union[str, Path] = "student-fp",
               device: Union[str, torch.device] = "cpu", quiet: bool = True,
               on_iter: Optional[Callable[[int], None]] = None):
    """The paper's "FP32 Distill-only" baseline: Alg. 4 with neither quantization nor C_DC, i.e. progressive
    distillation (Salimans & Ho) of the FP 100-step model into an FP 50-step one, with CAD's KD loss, budget and
    data-free training images, so that it differs from the CAD rows only in quantization.

    `model`: a diffusers model directory (None: the built-in teacher) or a LoadedModel. Writes a diffusers model
    directory (unet/, scheduler/, distillation.json, cad_log.json) that load_model and the samplers read (sample
    it with 50 steps); resumes from out_dir/cad_checkpoint.pt like distill(). Returns the student's LoadedModel."""
    from ..model_io import LoadedModel, load_model

    cfg = (cfg or CadConfig.preset("quick")).with_overrides(calib_loss="none", kd_teacher="quantized")
    cfg.validate()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device)
    cond = _conditioning(lm.unet, lm.is_conditional, lm.cond)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # FP_GIVEN keys the cache like the quantized students' images, so one drawn file serves both
    images, source = training_images(lm, cfg, out, device, lm.unet, FP_GIVEN, quiet, cond)
    res = run_cad(lm.unet, lm.scheduler_config, None, cfg, images, out, device, quiet, fingerprint=lm.fingerprint,
                  on_iter=on_iter, student_bits=None, cond=cond)
    res.student.save_pretrained(str(out / "unet"), safe_serialization=True)
    sched = out / "scheduler"
    sched.mkdir(exist_ok=True)
    from ..model_io import student_scheduler_config

    save_json_atomic(sched / "scheduler_config.json", student_scheduler_config(lm.scheduler_config,
                                                                                cfg.teacher_steps))
    save_json_atomic(out / DISTILL_ONLY_META, {
        "steps": cfg.teacher_steps // 2, "method": "distill-only (FP, CAD without quantization or C_DC)",
        "teacher_steps": cfg.teacher_steps, "teacher_fingerprint": lm.fingerprint, "iters": cfg.iters,
        "training_images": source})
    _finish(out, res.log, training_images=source)
    return load_model(out, device)
