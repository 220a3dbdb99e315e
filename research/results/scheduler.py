"""The scheduler: starts each ready job as a subprocess on a GPU lane, records states, resumes a work dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from pqcad_export.atomic import atomic_write_json
from research import module_env
from research.results.jobs import weights_ready
from research.results.plan import PLANS, Job, Plan, build_jobs


def job_state(work: Path, name: str) -> str:
    d = work / "jobs" / name
    if (d / "done.json").is_file():
        return "done"
    if (d / "failed.json").is_file():
        return "failed"
    if _alive(d / "pid"):
        return "elsewhere"  # started by an earlier scheduler of this work dir (replaced to widen --only)
    return "todo"


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def inputs_ready(job: Job, args) -> bool:
    sampled = (Path(args.work) / "jobs" / job.name / "sampled.json").is_file()
    if (job.kind in ("refstats", "score") or (job.kind == "eval" and sampled)) and not weights_ready(args.weights):
        return False
    if job.kind == "refstats" and args.data:
        d = Path(args.data)
        return d.is_file() or (d / "train-images-idx3-ubyte.gz").is_file()
    return True


def gpus_here() -> list[str]:
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        n = 0
    return [str(i) for i in range(n)] or ["cpu"]


def cmd_run(args) -> int:
    work = Path(args.work)
    # the scheduler's own pid, for a caller that must tell whether it still runs (run 6: the `$!` that
    # results_device.sh recorded for `setsid nohup python3 ...` named no live process in the next call although
    # the scheduler ran on, and the script started a second one; the jobs' own pid files worked throughout)
    work.mkdir(parents=True, exist_ok=True)
    (work / "scheduler.pid").write_text(str(os.getpid()))
    plan = PLANS[args.plan]
    gpus = gpus_here()
    jobs = select_jobs(build_jobs(plan, timing=args.timing and gpus != ["cpu"] and len(gpus) > 1), args.only,
                       is_done=lambda n: job_state(work, n) == "done")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if args.retry_failed:
        for n in jobs:
            (work / "jobs" / n / "failed.json").unlink(missing_ok=True)
    atomic_write_json(work / "plan.json", {"plan": asdict(plan), "jobs": {n: asdict(j) for n, j in jobs.items()},
                                     "gpus": gpus})
    deadline = time.time() + args.until if args.until else None
    running: dict[str, tuple[subprocess.Popen, str, float]] = {}
    excl_gpu = gpus[-1] if "timing-cifar-recon" in jobs else None
    t_start = time.time()
    while True:
        for name, (proc, gpu, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                print(f"[{time.time() - t_start:7.0f}s] {name} exit {proc.returncode} ({time.time() - t0:.0f}s) "
                      f"-> {job_state(work, name)}", flush=True)
        states = {n: job_state(work, n) for n in jobs}
        todo = [n for n, s in states.items() if s == "todo" and n not in running]
        if not todo and not running:
            break
        if deadline and time.time() > deadline:
            print("deadline reached; running jobs continue in the background of this process's children", flush=True)
            break
        for name in todo:
            j = jobs[name]
            if any(states.get(d) != "done" for d in j.deps) or not inputs_ready(j, args):
                continue
            gpu = pick_gpu(j, jobs, running, gpus, plan, excl_gpu, states)
            if gpu is None:
                continue
            env = module_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            if gpu != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = gpu
            cmd = [sys.executable, "-m", "research.results", "job", "--work", str(work), "--plan", args.plan, name]
            if args.weights:
                cmd += ["--weights", args.weights]
            if args.data:
                cmd += ["--data", args.data]
            log = open(work / "logs" / f"{name}.log", "a")
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            # written here, not only by the job once its imports are done: a scheduler that replaces this one a
            # second later must already see the job as running (run 2 started two copies of a job that way)
            (work / "jobs" / name).mkdir(parents=True, exist_ok=True)
            (work / "jobs" / name / "pid").write_text(str(proc.pid))
            running[name] = (proc, gpu, time.time())
            print(f"[{time.time() - t_start:7.0f}s] start {name} on {gpu}", flush=True)
        write_status(work, states, running)
        if not running and set(todo) <= blocked(jobs, states):
            break  # everything left depends, directly or not, on a failed job
        time.sleep(args.poll)
    write_status(work, {n: job_state(work, n) for n in jobs}, running)
    if running and not args.detach_children:
        for proc, _, _ in running.values():
            proc.wait()
    bad = [n for n in jobs if job_state(work, n) == "failed"]
    print(f"finished: {sum(job_state(work, n) == 'done' for n in jobs)}/{len(jobs)} done, failed: {bad}", flush=True)
    return 1 if bad else 0


def pick_gpu(j: Job, jobs, running, gpus, plan: Plan, excl_gpu, states) -> Optional[str]:
    load = {g: [jobs[n] for n, (_, gg, _) in running.items() if gg == g] for g in gpus}
    if j.lane == "exclusive":
        return excl_gpu if not load.get(excl_gpu) else None
    timing_busy = excl_gpu is not None and states.get("timing-cifar-recon") != "done"
    cands = [g for g in gpus if not (timing_busy and g == excl_gpu)]
    cap = {"eval": plan.eval_per_gpu, "score": plan.score_per_gpu, "train": plan.train_per_gpu}[j.lane]
    free = [g for g in cands if sum(x.lane == j.lane for x in load[g]) < cap]
    # the GPU with the fewest processes of this lane, then the fewest in all
    return min(free, key=lambda g: (sum(x.lane == j.lane for x in load[g]), len(load[g]))) if free else None


def select_jobs(jobs: dict[str, Job], patterns: list[str], is_done=lambda name: False) -> dict[str, Job]:
    """The jobs matching any of the fnmatch patterns plus what they still need (the dependencies of a finished job
    are not needed again: a work dir restored without its calibration sets does not redraw them), ordered by the
    first pattern they (or, for a dependency, a job needing them) match: the order the scheduler starts them in."""
    from fnmatch import fnmatch

    if not patterns:
        return jobs
    rank: dict[str, int] = {}
    for i, pat in enumerate(patterns):
        hits = [n for n in jobs if fnmatch(n, pat) and n not in rank]
        if not hits and not any(fnmatch(n, pat) for n in jobs):
            raise SystemExit(f"--only {pat!r} matches no job")
        stack = list(hits)
        while stack:
            n = stack.pop()
            if n not in rank:
                rank[n] = i
                if not is_done(n):
                    stack.extend(jobs[n].deps)
    order = {n: i for i, n in enumerate(jobs)}
    return {n: jobs[n] for n in sorted(rank, key=lambda n: (rank[n], order[n]))}


def blocked(jobs: dict[str, Job], states: dict[str, str]) -> set[str]:
    """Jobs that can never run: a dependency failed or is itself blocked."""
    blocked = {n for n, s in states.items() if s == "failed"}
    grew = True
    while grew:
        new = {n for n, j in jobs.items() if n not in blocked and any(d in blocked for d in j.deps)}
        blocked |= new
        grew = bool(new)
    return blocked


def write_status(work: Path, states: dict[str, str], running) -> None:
    atomic_write_json(work / "status.json", {n: "running" if n in running else s for n, s in states.items()})


def cmd_status(args) -> int:
    work = Path(args.work)
    st = json.loads((work / "status.json").read_text()) if (work / "status.json").is_file() else {}
    counts: dict[str, int] = {}
    for s in st.values():
        counts[s] = counts.get(s, 0) + 1
    print(json.dumps(counts), {n: s for n, s in st.items() if s in ("running", "failed")})
    for n, s in st.items():
        if s == "failed":
            print(n, json.loads((work / "jobs" / n / "failed.json").read_text())["error"][:300])
    return 0

