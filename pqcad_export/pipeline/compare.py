"""`compare`: latency and quality of candidates (engines, optionally the PyTorch fake-quant student) against the
FP32 teacher sampled with 100 DDIM steps in PyTorch. Writes report/compare.json (docs/architecture.md, "Report
contract"), compare.png and samples.png. A number that cannot be measured is null with a note, never invented.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import PqcadError
from ..model_io import LoadedModel
from ..sampling import SamplerConfig, TorchUNet, UNetFn, ddim_sample, to_uint8
from ..atomic import atomic_write_json
from ..progress import StageBars


@dataclass
class CompareConfig:
    samples: int = 100            # images per model for FID-to-FP32 (same initial noise for every model)
    seed: int = 0
    batch_size: int = 25          # sampling batch of the FID images (throughput does not matter there)
    latency_batch: int = 1        # batch of the latency measurements (1 = one image at a time, as on the edge)
    latency_iters: int = 10       # timed UNet calls (median reported) after `warmup`
    image_runs: int = 10          # timed full DDIM runs at latency_batch (median reported) after one warm-up run
    warmup: int = 3
    teacher_steps: int = 100
    eta: float = 0.0
    device: str = "cpu"
    ref_stats: Optional[str] = None      # refstats folder or .npz with mu/sigma[/features] of the data set
    ref_images: Optional[str] = None     # data images (folder / .npy / .npz): statistics computed once, cached
    fid_weights: Optional[str] = None    # TF-Inception default_1.pt (else $PQCAD_FID_WEIGHTS / installed package)
    no_fid: bool = False                 # skip all Inception work (latency only)
    fp_references: bool = True           # CPU: also the FP model on ONNX Runtime FP32 and OpenVINO (default prec.)
    reference_fid: bool = False          # also sample + score those references (costs two more 100-step runs)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "CompareConfig":
        base = {"quick": {}, "paper": {"samples": 10000, "batch_size": 250, "image_runs": 20}}
        if name not in base:
            raise PqcadError(f"unknown preset {name!r} (quick or paper)")
        bad = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if bad:
            from ..errors import UsageError

            raise UsageError(f"unknown compare option(s): {', '.join(bad)}")
        kw = {**base[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**kw)


@dataclass
class Candidate:
    """Something that produces eps like the teacher: an engine or a PyTorch module."""

    name: str
    backend: str
    precision: str
    steps: int
    unet: UNetFn
    model_bytes: Optional[int]
    scheduler_config: dict[str, Any]
    executed_on: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    from engines.base import cpu_info

    name, flags = cpu_info()
    cpu = name or platform.processor() or platform.machine()
    # the widest integer dot-product ISA sets INT8 CPU latency (the same engine ran ~2x apart on an AVX2 and a
    # VNNI EPYC: docs/RESULTS.md, Efficiency)
    isa = next((label for flag, label in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                                          ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    return f"CPU {cpu}, {os.cpu_count()} cores{', ' + isa if isa else ''} (torch {torch.__version__})"


def time_unet(fn: UNetFn, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor], warmup: int,
              iters: int) -> float:
    """Median ms per UNet call, timed as engines time themselves (engines.base: CUDA events on GPU, perf_counter on
    CPU)."""
    from engines.base import time_cpu, time_cuda

    timer = time_cuda if x.device.type == "cuda" else time_cpu
    with torch.no_grad():
        return float(timer(lambda: fn(x, t, cond), int(x.shape[0]), warmup, iters).median_ms)


def time_sampler(fn: UNetFn, scheduler_config: dict[str, Any], shape: tuple[int, int, int], steps: int,
                 batch: int, eta: float, device: torch.device, runs: int) -> float:
    """Median ms per image of complete DDIM sampling runs (all `steps` UNet calls + scheduler) at `batch`."""
    cfg = SamplerConfig(steps=steps, eta=eta, batch_size=batch, seed=12345)
    out = []
    for i in range(runs + 1):  # the first run is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ddim_sample(fn, scheduler_config, shape, batch, cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            out.append((time.perf_counter() - t0) * 1e3 / batch)
    return float(np.median(out))


def _entry(name: str, backend: str, precision: str, steps: int, unet_ms: Optional[float],
           ms_img: Optional[float], model_bytes: Optional[int]) -> dict[str, Any]:
    return {"name": name, "backend": backend, "precision": precision, "steps": steps,
            "unet_ms_per_call": None if unet_ms is None else round(unet_ms, 4),
            "ms_per_image": None if ms_img is None else round(ms_img, 4),
            "fid": None, "fid_to_fp32": None, "kid": None, "kid_std": None, "kid_to_fp32": None,
            "psnr_to_fp32": None, "ssim_to_fp32": None, "model_bytes": model_bytes}


def check_engine_model(info, teacher: LoadedModel, engine_dir) -> list[str]:
    """Refuse an engine built from another model (engine.json `model_fingerprint`); notes when it cannot tell."""
    fp = getattr(info, "model_fingerprint", None)
    if fp is None:
        return ["engine.json records no source-model fingerprint (built before it was recorded): the model could "
                "not be checked"]
    if fp != teacher.fingerprint:
        raise PqcadError(f"engine {engine_dir} was built from model {fp}, not from {teacher.path} "
                         f"({teacher.fingerprint}); pass the --model it was made from")
    return []


def run_compare(teacher: LoadedModel, candidates: list[Candidate], out_dir: str | Path, cfg: CompareConfig,
                quiet: bool = False) -> dict[str, Any]:
    """Measure everything and write compare.json / compare.png / samples.png into out_dir."""
    out_dir = Path(out_dir)
    device = torch.device(cfg.device)
    notes: list[str] = []
    shape = teacher.sample_shape
    b = min(cfg.batch_size, cfg.samples)
    lb = cfg.latency_batch
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x_lat = torch.randn((lb, *shape), generator=g).to(device)
    t_lat = torch.full((lb,), 500, dtype=torch.long, device=device)
    teacher_fn = TorchUNet(teacher.unet.to(device), teacher.cond)
    if teacher.cond is not None:
        notes.append(f"conditioning: {teacher.cond.label}")
    images: dict[str, torch.Tensor] = {}
    with StageBars(quiet) as bar:
        adv = bar.task("latency, FP32 teacher", 1)
        ref_ms = time_unet(teacher_fn, x_lat, t_lat, None, cfg.warmup, cfg.latency_iters)
        ref_ms_img = time_sampler(teacher_fn, teacher.scheduler_config, shape, cfg.teacher_steps, lb, cfg.eta,
                                  device, cfg.image_runs)
        adv(1)
        ref_imgs = ddim_sample(teacher_fn, teacher.scheduler_config, shape, cfg.samples,
                               SamplerConfig(steps=cfg.teacher_steps, eta=cfg.eta, batch_size=b, seed=cfg.seed),
                               device, progress=bar.task(f"FP32 teacher, {cfg.teacher_steps} steps", cfg.samples))
        images["reference"] = to_uint8(ref_imgs)
        reference = _entry("fp32-teacher", "pytorch", "fp32", cfg.teacher_steps, ref_ms, ref_ms_img,
                           _teacher_bytes(teacher))
        built = _engine_references(teacher, out_dir, cfg, device, notes)
        joint = _joint_call_latency(built, candidates, cfg, notes, bar)
        calls = {r["name"]: r["median_ms"] for r in (joint or {}).get("rows", [])}
        references = [reference] + _measure_references(built, calls, teacher, cfg, shape, device, images, bar, b)
        from engines.bench import ratio

        from .references import fastest

        best = fastest(references) or reference
        cand_entries = []
        for c in candidates:
            cdev = device if c.executed_on != "cpu" else torch.device("cpu")
            try:
                adv = bar.task(f"latency, {c.name}", 1)
                ms = calls.get(c.name) if cdev.type == "cpu" else None
                if ms is None:
                    ms = time_unet(c.unet, x_lat.to(cdev), t_lat.to(cdev), None, cfg.warmup, cfg.latency_iters)
                ms_img = time_sampler(c.unet, c.scheduler_config, shape, c.steps, lb, cfg.eta, cdev, cfg.image_runs)
                adv(1)
                imgs = ddim_sample(c.unet, c.scheduler_config, shape, cfg.samples,
                                   SamplerConfig(steps=c.steps, eta=cfg.eta, batch_size=b, seed=cfg.seed), cdev,
                                   progress=bar.task(f"{c.name}, {c.steps} steps", cfg.samples))
            except PqcadError:
                raise
            except Exception as exc:  # an engine that fails to run is reported, not hidden
                raise PqcadError(f"candidate {c.name} ({c.backend}) failed to run: {exc}") from None
            if not torch.isfinite(imgs).all():
                raise PqcadError(f"candidate {c.name} produced non-finite images")
            images[c.name] = to_uint8(imgs)
            e = _entry(c.name, c.backend, c.precision, c.steps, ms, ms_img, c.model_bytes)
            e["speedup_vs_reference"] = round(best["ms_per_image"] / ms_img, 3) if ms_img else None
            e["speedup_reference"] = best["name"]  # the fastest FP reference per image
            paired = ratio(joint, best["name"], c.name, lb) if joint else None  # None unless both ran in it
            e["unet_speedup_vs_reference"] = paired or (round(best["unet_ms_per_call"] / ms, 3)
                                                        if ms and best["unet_ms_per_call"] else None)
            e["speedup_vs_pytorch_fp32"] = round(ref_ms_img / ms_img, 3) if ms_img else None
            e["status"] = "executed"
            e.update(c.extra)
            e["notes"] = list(c.notes)
            _precision_nulls(e)
            cand_entries.append(e)
        fid_features, quality = None, None
        if cfg.no_fid:
            notes.append("fid, fid_to_fp32, kid, psnr/ssim_to_fp32: skipped (--no-fid)")
        elif shape[0] not in (1, 3):  # e.g. a latent-diffusion UNet: its samples need a VAE to become images
            notes.append(f"fid, fid_to_fp32, kid, psnr/ssim_to_fp32: skipped: the UNet samples {shape[0]}-channel "
                         "latents, not images")
        else:
            scored_refs = [r for r in references[1:] if r["name"] in images]  # FP engines that sampled
            fid_features, quality = _score(cfg, images, reference, cand_entries + scored_refs, notes, bar, teacher)
        for e in cand_entries:  # "executed" = ran here and produced images that were scored (architecture.md)
            if e.get("fid_to_fp32") is None:
                e["status"] = "ran (images not scored)"
    pair_mse = {e["name"]: e.pop("_pair_mse") for e in cand_entries if "_pair_mse" in e}
    report = {
        "reference": reference, "candidates": cand_entries, "samples": cfg.samples,
        "references": references, "speedup_reference": best["name"],
        "device": device_description(device), "fid_features": fid_features, "seed": cfg.seed,
        "batch_size": b, "latency_batch": lb,
        "latency": f"unet_ms_per_call: median of {cfg.latency_iters} timed UNet calls after {cfg.warmup} warm-up "
        f"calls at batch {lb} (CPU engines: each in its own process, all taking turns in one run, "
        "unet_speedup_vs_reference = median of the per-turn ratios); ms_per_image: median of {cfg.image_runs} "
        f"timed complete DDIM runs (all steps) at batch {lb} after one warm-up run, divided by {lb}",
        "notes": notes, "config": asdict(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if joint:  # the CPU engines' per-call run: what unet_ms_per_call and unet_speedup_vs_reference come from
        keys = ("rows", "method", "threads", "cpu_isa", "load_average_before")
        report["unet_call_run"] = {k: joint[k] for k in keys}
    if quality is not None:
        report["quality"] = quality
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "compare.json", report)
    from .report_png import plot_report, samples_png

    plot_report(report, out_dir / "compare.png")
    samples_png(images, out_dir / "samples.png", pair_mse)
    return report


PRECISION_KEYS = ("avg_act_bits", "bops", "int_layers", "float_layers", "fp_mac_fraction")


def precision_summary(quant_meta: dict[str, Any]) -> dict[str, Any]:
    """MAC-weighted average input bits (FP inputs count 16), BOPs per image and integer / float-input layer counts
    of a quantized model, from its quant.json (the mixed-precision plan's record; counts from its layer specs)."""
    mp = quant_meta.get("mixed_precision") or {}
    layers = mp.get("layers") or {n: {"act": f"int{sp['act_bits']}" if sp["act_quant"] else "fp"}
                                  for n, sp in (quant_meta.get("layers") or {}).items() if sp.get("kind") != "attn"}
    ints = sum(1 for v in layers.values() if v["act"] != "fp")
    return {"avg_act_bits": mp.get("avg_act_bits"), "bops": mp.get("bops"), "int_layers": ints,
            "float_layers": len(layers) - ints, "fp_mac_fraction": mp.get("fp_mac_fraction")}


def _precision_nulls(e: dict[str, Any]) -> None:
    missing = [k for k in PRECISION_KEYS if e.get(k) is None]
    for k in missing:
        e[k] = None
    if missing:
        e["notes"].append(f"{', '.join(missing)}: null (no quant.json mixed-precision record for this candidate)")


def _engine_references(teacher, out_dir: Path, cfg: CompareConfig, device, notes) -> list:
    """The FP teacher built as ONNX Runtime FP32 and OpenVINO engines (pipeline/references.py): [(spec, error)]."""
    if not cfg.fp_references:
        return []
    if device.type != "cpu":
        notes.append("FP engine references (ONNX Runtime, OpenVINO) are CPU engines: not measured on " + device.type)
        return []
    from .references import build_references

    return build_references(teacher, out_dir / "references", notes)


def _measure_references(built: list, calls: dict[str, float], teacher, cfg: CompareConfig, shape, device, images,
                        bar, b: int) -> list[dict[str, Any]]:
    """Their compare.json entries, one engine at a time (per-call latency from the joint run `calls`)."""
    from .references import measure_reference

    out = []
    for spec, err in built:
        adv = bar.task(f"latency, {spec.name}", 1)

        def sample(eng, name=spec.name):
            return ddim_sample(eng, teacher.scheduler_config, shape, cfg.samples,
                               SamplerConfig(steps=cfg.teacher_steps, eta=cfg.eta, batch_size=b, seed=cfg.seed),
                               device, progress=bar.task(f"{name}, {cfg.teacher_steps} steps", cfg.samples))

        e = measure_reference(spec, err, calls.get(spec.name), teacher, cfg, shape, device, time_sampler, _entry,
                              sample if cfg.reference_fid and not cfg.no_fid else None)
        if "_images" in e:
            images[spec.name] = to_uint8(e.pop("_images"))
        out.append(e)
        adv(1)
    return out


def _joint_call_latency(built: list, candidates: list[Candidate], cfg: CompareConfig, notes: list[str],
                        bar) -> Optional[dict[str, Any]]:
    """Per-call latency of every CPU engine (FP references and candidates) in one engines.bench run: each engine
    in its own process, the processes taking turns, so a ratio between two of them is per round, not between
    measurements taken minutes apart on a machine whose speed drifts. None (with a note) when there is nothing
    to time or the run failed."""
    from engines.bench import BenchTarget, run_bench

    targets = [BenchTarget(spec.name, "engine", str(spec.engine_dir)) for spec, err in built if err is None]
    targets += [BenchTarget(c.name, "engine", str(c.extra["engine_dir"])) for c in candidates
                if c.extra.get("engine_dir") and c.backend in ("onnxruntime", "openvino") and c.executed_on == "cpu"]
    if not targets:
        return None
    adv = bar.task("latency per UNet call, CPU engines taking turns", 1)
    try:
        rep = run_bench(targets, [cfg.latency_batch], reps=1, rounds=min(5, cfg.latency_iters),
                        warmup=cfg.warmup, iters=cfg.latency_iters)
    except (RuntimeError, ValueError) as exc:
        notes.append(f"unet_ms_per_call of the CPU engines: the joint run failed ({exc}); timed one by one "
                     "instead")
        return None
    adv(1)
    return rep


def _teacher_bytes(teacher: LoadedModel) -> Optional[int]:
    for base in (teacher.path, teacher.path / "unet"):
        f = base / "diffusion_pytorch_model.safetensors"
        if f.is_file():
            return f.stat().st_size
    return None


def _score(cfg: CompareConfig, images: dict[str, torch.Tensor], reference: dict, cands: list[dict],
           notes: list[str], bar: StageBars, teacher: LoadedModel) -> tuple[Optional[str], Optional[dict]]:
    from ..metrics import InceptionFeatures, feature_stats
    from ..metrics.fid import fid_features_vs_stats
    from ..model_io import DEFAULT_MODEL_DIR
    from .quality import resolve_reference, score_quality

    try:
        ext = InceptionFeatures(cfg.fid_weights, device=cfg.device)
    except PqcadError as exc:
        notes.append(f"fid, fid_to_fp32, kid: no feature extractor ({exc})")
        return None, None
    feats = {}
    for name, imgs in images.items():
        adv = bar.task(f"Inception features ({name})", imgs.shape[0])
        feats[name] = ext.features(imgs, progress=False)
        adv(imgs.shape[0])
    builtin = Path(teacher.path).resolve() == DEFAULT_MODEL_DIR.resolve()
    ref = resolve_reference(cfg, ext, builtin, teacher.sample_shape, notes, progress=not bar.quiet)
    ref_stats = ref.stats if ref is not None else None
    stats = {k: feature_stats(v) for k, v in feats.items()}
    if cfg.samples < 2048:
        notes.append(f"fid/fid_to_fp32 use {cfg.samples} samples per model (< 2048 feature dims): the values are "
                     "biased upwards and only comparable between entries of this report")
    if ref_stats is not None:
        reference["fid"] = round(fid_features_vs_stats(feats["reference"], *ref_stats), 4)
    reference["fid_to_fp32"] = 0.0
    for e in cands:
        e["fid_to_fp32"] = round(fid_features_vs_stats(feats[e["name"]], *stats["reference"]), 4)
        if ref_stats is not None:
            e["fid"] = round(fid_features_vs_stats(feats[e["name"]], *ref_stats), 4)
    return ext.id, score_quality(feats, images, reference, cands, ref, notes, cfg.seed)
