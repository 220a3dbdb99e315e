"""`quantize_model`: block reconstruction (BRECQ / Q-Diffusion style) of a whole UNet, with per-block checkpoints.

For each unit, in execution order:
  1. inputs: the unit's inputs in the *quantized* model (earlier units already quantized and frozen);
     targets: the FP unit's outputs in the FP model; optionally Fisher weights E[(J^T r)^2] = diag(J^T J) with
     J = d eps / d unit-output (a one-probe Hutchinson estimate), the squared-gradient weighting of Eq. (5).
  2. weights: AdaRound on the output MSE (+ rounding regulariser), through a registered schedule (schedules.py):
     direct (kappa bits), pq (tau = 2 kappa then kappa, progressive.py), bitshrink (fixed cycles, bitshrink.py)
     or rtn (floor.py); Alg. 2 l. 19-20.
  3. activations: LSQ step sizes, initialised from data, weights hard-rounded, optional QDrop (Alg. 2 l. 21-22).
  4. freeze to integers, write the unit's state atomically (checkpoints.py), go on.
Everything stays on `device`; the loss is read back only every `sync_every` iterations.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..bits import BitSpec, parse_bits
from ..config_base import parse_choice
from ..errors import PqcadError
from . import bitshrink, fbr, progressive, unit_optimizer  # noqa: F401  (register their schedules and losses)
from .blocks import Unit, find_units
from .capture import calib_batch, calibration_hash, capture_inputs, capture_targets, collect_calibration
from .checkpoints import (atomic_save_tensors, atomic_write_json, cached_sensitivity, load_unit_state,
                          open_progress, resume_key, unit_state)
from .config import Method, ReconConfig
from .floor import restore, snapshot
from .model import QuantizedModel
from .plan import MixedPrecision, decide_plan, plan_from_specs
from .schedules import get_loss_context, get_schedule
from .sensitivity import mac_table
from .wrap import freeze_all, layer_specs, wrap_unet


def _make_progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[phase]:>3} loss {task.fields[loss]}"), TimeElapsedColumn())


def quantize_model(loaded, calib_batches: Iterable[dict], bits: BitSpec | str = "w4a8", method: str = "pq",
                   cfg: Optional[ReconConfig] = None, device: str | torch.device = "cpu",
                   checkpoint_dir: Optional[str | Path] = None,
                   on_unit_done: Optional[Callable[[int, str], None]] = None) -> QuantizedModel:
    """Quantize a `model_io.LoadedModel` (weights AdaRound, activations LSQ) block by block.

    `checkpoint_dir`: after each finished block its state is written atomically; a rerun with the same model,
    data, bits, method and config skips finished blocks and ends bit-identical to an uninterrupted run.
    `on_unit_done(index, name)` is called after each block is finished and checkpointed.
    """
    cfg = cfg or ReconConfig.preset("quick")
    bits = parse_bits(bits) if isinstance(bits, str) else bits
    method = parse_choice(Method, method, "--method").value
    schedule = get_schedule(method)
    device = torch.device(device)
    t_start = time.time()

    calib = collect_calibration(calib_batches, device, cfg.max_calib)
    fp = loaded.unet
    if calib["sample"].shape[1:] != torch.Size(loaded.sample_shape):
        raise PqcadError(f"calibration samples have shape {tuple(calib['sample'].shape[1:])}, "
                         f"the model expects {loaded.sample_shape}")
    if loaded.is_conditional and "encoder_hidden_states" not in calib:
        raise PqcadError("a conditional UNet needs 'encoder_hidden_states' in the calibration data")
    fp = fp.to(device).float().eval()
    fp.requires_grad_(False)
    pcfg = cfg.plan_config()
    sens = None
    if pcfg.mode is MixedPrecision.AUTO:  # decided before reconstruction, applied when wrapping
        sens = cached_sensitivity(fp, calib, bits, cfg, loaded.fingerprint, checkpoint_dir)
    plan = decide_plan(sens, pcfg, bits.act_bits, bits.quantize_activations)
    qmodel = copy.deepcopy(fp)
    wrap_unet(qmodel, bits, cfg.first_last_bits, cfg.attn_matmul_quant, cfg.io_act_quant,
              fp_act=plan.fp_act_layers, w8=plan.w8_layers)
    qmodel.requires_grad_(False)
    units = find_units(fp, calib_batch(calib, slice(0, 2)))  # same module names; FP avoids lazy inits

    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    key = {"bits": bits.name, "method": method, "cfg": cfg.key_dict(), "model": loaded.fingerprint,
           "calib": calibration_hash(calib), "units": [u.name for u in units]}
    if pcfg.mode is not MixedPrecision.OFF:
        key["plan"] = {"fp_act": plan.fp_act_layers, "w8": plan.w8_layers}
    progress_doc = open_progress(ckpt, resume_key(key))

    logs: list[dict] = list(progress_doc["log"])
    reused = 0
    with _make_progress(cfg.progress) as progress:
        for ui, unit in enumerate(units):
            upath = ckpt / f"unit_{ui:03d}.safetensors" if ckpt else None
            if unit.name in progress_doc["done"] and upath is not None and upath.is_file():
                load_unit_state(qmodel, unit, upath)
                reused += 1
                continue
            t0 = time.time()
            entry = _reconstruct_unit(qmodel, fp, unit, calib, cfg, schedule, device, ui, bits, progress)
            entry["seconds"] = round(time.time() - t0, 3)
            entry["method"] = method
            logs.append(entry)
            if ckpt is not None:
                atomic_save_tensors(upath, unit_state(qmodel, unit))
                progress_doc["done"].append(unit.name)
                progress_doc["log"] = logs
                atomic_write_json(ckpt / "progress.json", progress_doc)
            if on_unit_done is not None:
                on_unit_done(ui, unit.name)

    freeze_all(qmodel)  # layers no unit executed keep round-to-nearest
    qmodel.eval()
    perts = [e["pert"] for e in logs if e.get("pert") is not None]
    log = {"method": method, "bits": bits.name, "units": logs,
           "geomean_pert": _geomean(perts), "seconds": round(time.time() - t_start, 3),
           "device": str(device), "config": cfg.key_dict(), "reused_units": reused}
    meta = {"bits": bits.name, "method": method, "steps": 100, "scheduler_config": dict(loaded.scheduler_config),
            "unet_config": _unet_config(fp), "class_name": loaded.class_name,
            "source_fingerprint": loaded.fingerprint, "first_last_bits": cfg.first_last_bits,
            "attn_matmul_quant": cfg.attn_matmul_quant, "io_act_quant": cfg.io_act_quant,
            "layers": layer_specs(qmodel),
            "calibration": {"n": int(calib["sample"].shape[0]), "hash": key["calib"]}}
    costs = sens or mac_table(fp, calib_batch(calib, slice(0, 1)))
    meta["mixed_precision"] = plan_from_specs(meta["layers"], costs, pcfg, plan).to_dict()
    floors = [e["name"] for e in logs if e.get("floor_used")]
    log["floor_used_blocks"] = floors
    return QuantizedModel(unet=qmodel, bits=bits, method=method, meta=meta, log=log, sensitivity=sens)


def _geomean(xs: list[float]) -> Optional[float]:
    xs = [max(float(x), 1e-30) for x in xs]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _unet_config(unet: nn.Module) -> dict[str, Any]:
    cfg = dict(unet.config)
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _reconstruct_unit(qmodel, fp, unit: Unit, calib, cfg: ReconConfig, schedule, device, ui: int, bits: BitSpec,
                      progress) -> dict[str, Any]:
    seed = cfg.seed * 1_000_003 + ui
    inputs = capture_inputs(qmodel, unit, calib, cfg.capture_batch_size)
    target, fw = capture_targets(fp, unit, calib, cfg.capture_batch_size, cfg.fisher, seed)
    ctx = get_loss_context(cfg.recon_loss).create(qmodel, unit, inputs, target, fw, cfg, device, seed, progress,
                                                  fp_model=fp, calib=calib)
    entry: dict[str, Any] = {"name": unit.name, "layers": [n for n, _ in unit.quant_layers(qmodel)],
                             "bits_final": ctx.final_bits}
    has_act = bits.quantize_activations and bool(ctx.act_quantizers())
    total = 0
    if progress is not None:
        total = (cfg.iters if ctx.layers else 0) + (cfg.act_iters if has_act else 0)
        ctx._task = progress.add_task(f"[{ui + 1}] {unit.name}", total=max(total, 1), loss="-", phase="")
    act_flags = [(q, q.enabled) for m in ctx.layers for q in m.act_quantizers()]
    act_flags += [(q, q.enabled) for p in unit.attn_processors(qmodel) for q in p.act_quantizers()]
    learns = getattr(schedule, "learns", True)
    floor = None
    if ctx.held_idx.numel() and (ctx.layers or has_act):  # RTN + MSE-scale start, judged on held-out rows
        ctx.init_weights(ctx.final_bits, mode="nearest")  # the learned schedules start from this init too
        if has_act:
            ctx.init_act_scales()
        floor = snapshot(ctx, ctx.act_quantizers())
        entry["heldout_rtn"] = ctx.perturbation(ctx.held_idx)
    for q, _ in act_flags:
        q.enabled = False
    try:
        if ctx.layers:
            ctx.init_weights(ctx.final_bits, mode="nearest")
            entry["pert_nearest_w"] = ctx.perturbation()
            with torch.enable_grad():
                entry.update(schedule(ctx))
            for m in ctx.layers:
                m.wq.mode = "hard"
                if not torch.isfinite(m.wq.alpha).all() or not torch.isfinite(m.w_fp).all():
                    raise PqcadError(f"non-finite weights in block {unit.name}"
                                     f"; no quantized model was written (finished blocks stay checkpointed)")
            entry["pert_w"] = ctx.perturbation()
    finally:
        for q, en in act_flags:
            q.enabled = en
    if has_act and (learns or floor is None):
        ctx.init_act_scales()
        with torch.enable_grad():
            ctx.optimize_act_scales(cfg.act_iters if learns else 0)
    if floor is not None:
        entry["heldout_learned"] = ctx.perturbation(ctx.held_idx)
        entry["floor_used"] = bool(entry["heldout_learned"] > entry["heldout_rtn"])
        if entry["floor_used"]:  # learning lost to its own starting point: keep the start
            restore(ctx, floor, ctx.act_quantizers())
        entry["heldout_final"] = ctx.perturbation(ctx.held_idx)
    entry["pert"] = ctx.perturbation()
    if not math.isfinite(entry["pert"]):
        raise PqcadError(f"non-finite output of block {unit.name}"
                         f"; no quantized model was written (finished blocks stay checkpointed)")
    entry["events"] = ctx.events
    curve = ctx.loss_curve()
    stride = max(1, len(curve) // 1000)
    entry["curve_stride"] = stride
    entry["curve"] = curve[::stride]
    for m in ctx.layers:
        m.freeze()
    if progress is not None:
        progress.update(ctx._task, completed=max(total, 1))
    return entry
