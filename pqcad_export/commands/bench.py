"""`pqcad-export bench`: per-UNet-call latency of engines, each in its own process, interleaved (engines.bench)."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import MODEL_HELP, friendly, main


@main.command()
@click.option("--onnx", "onnx_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="a QDQ export: timed on OpenVINO and as the ONNX Runtime INT8 engine")
@click.option("--model", default=None, help=MODEL_HELP + " (its FP ONNX is the FP32 / OpenVINO reference)")
@click.option("--no-fp", is_flag=True, help="leave out the FP references")
@click.option("--target", "specs", multiple=True,
              help="extra NAME=engine|onnxruntime|openvino:PATH[@PRECISION] (an engine dir or an ONNX file)")
@click.option("--batch", "batches", multiple=True, type=int, default=(1, 8), show_default=True)
@click.option("--reps", default=3, show_default=True, type=click.IntRange(min=1),
              help="repetitions, each with fresh processes")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(min=1),
              help="turns per process and repetition: the engines take turns, so slow drifts of the machine hit "
              "them alike; ratios are per round")
@click.option("--iters", default=50, show_default=True, type=click.IntRange(min=1),
              help="timed calls per process and repetition (split over the rounds)")
@click.option("--warmup", default=5, show_default=True)
@click.option("--threads", default=0, show_default=True, help="intra-op threads (0 = all cores)")
@click.option("--workdir", default="bench_work", show_default=True, type=click.Path(file_okay=False))
@click.option("--dynamic", is_flag=True, help="also the FP and INT8 OpenVINO models with a dynamic batch dimension "
              "(the default, as the engine runs, compiles each batch's static shape; --target openvino: files are "
              "timed static)")
@click.option("--profile", is_flag=True, help="also time per op type (OpenVINO PERF_COUNT, ORT profiler) at the "
              "largest batch")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="write the report here")
@friendly
def bench(onnx_file, model, no_fp, specs, batches, reps, rounds, iters, warmup, threads, workdir, dynamic, profile,
          json_out):
    """Time engines, one process per (engine, batch), taking turns; medians, spread, paired ratios, ISA, threads.

    "vs fastest FP" is the median over rounds of (fastest FP engine's round median) / (this engine's)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from engines.bench import BenchTarget, ratio_stats, run_bench

    from ..errors import PqcadError, UsageError
    from ..pipeline.references import FP_TARGET_PREFIXES, bench_targets, fastest_fp_row

    con = Console(stderr=True)
    try:
        extra = [BenchTarget.parse(s) for s in specs]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    with con.status("preparing engines..."):
        targets = bench_targets(onnx_file, model, work, fp=not no_fp, dynamic=dynamic) + extra
    if not targets:
        raise UsageError("nothing to time: give --onnx, --target, or leave the FP references on")
    try:
        with con.status("timing...") as st:
            rep = run_bench(targets, list(batches), reps=reps, threads=threads, warmup=warmup, iters=iters,
                            rounds=rounds, progress=lambda m: st.update(f"timing: {m}"))
    except (RuntimeError, ValueError) as exc:
        raise PqcadError(str(exc)) from None
    t = Table(title=f"ms per UNet call, {rep['cpu_isa'] or rep['cpu']}, {rep['threads']} threads")
    for col in ("engine", "prec", "batch", "median", "spread", "vs fastest FP"):
        t.add_column(col)
    rep["ratios_vs_fastest_fp"], lines = [], []
    for b in batches:
        best = fastest_fp_row(rep, b)
        for r in (r for r in rep["rows"] if r["batch"] == b):
            st = ratio_stats(rep, best["name"], r["name"], b) if best else None
            t.add_row(r["name"], r["precision"], str(b), f"{r['median_ms']:.2f}", f"{100 * r['spread']:.0f}%",
                      f"{st['median']:.2f}x" if st else "-")
            if st and not r["name"].startswith(FP_TARGET_PREFIXES):
                rep["ratios_vs_fastest_fp"].append({"batch": b, "engine": r["name"], "reference": best["name"], **st})
                if st["rounds"]:
                    lines.append(f"batch {b}, {r['name']}: {st['median']:.2f}x; middle half of {st['rounds']} "
                                 f"rounds {st['p25']:.2f}-{st['p75']:.2f}x")
    Console().print(t)
    for line in lines:
        con.print(line)
    if profile:
        rep["profile"] = _profile(targets, max(batches), threads)
        for name, ops in rep["profile"].items():
            con.print(f"{name}: " + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in ops[:6]))
    if json_out:
        Path(json_out).write_text(json.dumps(rep, indent=2))
        con.print(f"wrote {json_out}")


def _profile(targets, batch: int, threads: int) -> dict:
    """Per op type time of each target (after the isolated timing, one at a time in this process)."""
    from engines.manifest import read_manifest
    from engines.profile import onnxruntime_ops, openvino_ops

    out = {}
    for t in targets:
        backend, path, level, prec, static = t.backend, t.path, t.level, t.precision, t.static_batch
        if backend == "engine":
            info = read_manifest(path)
            backend, path = info.backend, str(info.path)
            level = (info.options or {}).get("optimization_level", "extended")
            prec = (info.options or {}).get("precision", "default")
            static = bool((info.options or {}).get("static_batch", False))
        if backend == "openvino":  # the graph that was timed: static or dynamic batch
            out[t.name] = openvino_ops(path, batch, prec, threads, static_batch=static)
        elif backend == "onnxruntime":
            out[t.name] = onnxruntime_ops(path, batch, level, threads)
    return out

