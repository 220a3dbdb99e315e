"""research.results (the paper-tables job graph): graph consistency and table rendering (no GPU, no training)."""

import json

import numpy as np
import pytest

from pqcad_export.errors import UsageError
from pqcad_export.quantize import PQConfig, ReconConfig

from research.results import cli, jobs as job_bodies, plan as graph, scheduler, tables


@pytest.mark.parametrize("plan", sorted(graph.PLANS))
def test_job_graph_is_closed_and_acyclic(plan):
    jobs = graph.build_jobs(graph.PLANS[plan], timing=True)
    for j in jobs.values():
        assert j.kind in job_bodies.JOB_BODIES
        assert all(d in jobs for d in j.deps), (j.name, j.deps)
    done: set = set()
    while len(done) < len(jobs):  # topological peel: fails (no progress) on a cycle
        ready = {n for n, j in jobs.items() if n not in done and set(j.deps) <= done}
        assert ready, f"cycle among {set(jobs) - done}"
        done |= ready
    # every evaluated model is scored, and every table row has a job behind it
    assert {n[len("eval-"):] for n in jobs if n.startswith("eval-")} == \
           {n[len("score-"):] for n in jobs if n.startswith("score-")}
    for b in graph.BITS:
        for key, _ in tables.ROW_LABELS:
            assert f"score-{key.format(b=b)}" in jobs
    for key, _ in tables.ABLATION_LABELS:
        assert f"score-{key}" in jobs


def test_tables_render_measured_values_and_mark_missing(tmp_path):
    jobs = {"score-fp32-100": {"status": "done", "fid": 7.04, "fid_to_fp32": 0.0, "sfid": 32.7, "precision": 0.637,
                               "recall": 0.691, "steps": 100},
            "score-quant-w4a8-bitshrink": {"status": "failed", "error": "RuntimeError: boom"},
            "quant-w4a8-direct": {"status": "done", "geomean_pert": 0.02},
            "quant-w4a8-pq": {"status": "done", "geomean_pert": 0.01,
                              "transitions": {"a": {"iter": 25, "how": "detector"}, "b": {"iter": 50, "how": "forced"}}}}
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"jobs": jobs}))
    md = tmp_path / "R.md"
    md.write_text("intro\n<!-- RESULTS-TABLES -->\nold\n<!-- /RESULTS-TABLES -->\nend\n")
    assert cli.main(["tables", "--results", str(p), "--md", str(md)]) == 0
    text = md.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("end")
    assert "| FP32, 100 steps | 7.04 | 0.00 | 32.70 | 0.637 | 0.691 | 100 |" in text
    assert "RuntimeError: boom" in text
    assert "+50.00 %" in text and "| 1/2 |" in text  # Delta_Pert = 1 - 0.01/0.02; one detector transition of two


def test_recon_config_accepts_pq_settings_as_dict():
    cfg = ReconConfig.preset("paper", pq={"window": 20, "pi": 0.05})
    assert isinstance(cfg.pq, PQConfig) and cfg.pq.window == 20 and cfg.pq.pi == 0.05
    with pytest.raises(UsageError, match="bad PQ settings"):
        ReconConfig.preset("paper", pq={"windw": 20})


def test_blocked_is_transitive():
    jobs = {"a": graph.Job("a", "quant"), "b": graph.Job("b", "cad", ["a"]),
            "c": graph.Job("c", "eval", ["b"]), "d": graph.Job("d", "eval")}
    states = {"a": "failed", "b": "todo", "c": "todo", "d": "todo"}
    assert scheduler.blocked(jobs, states) == {"a", "b", "c"}


def test_only_selects_matches_with_their_dependencies_in_pattern_order():
    jobs = graph.build_jobs(graph.PLANS["smoke"], timing=False)
    sel = scheduler.select_jobs(jobs, ["score-cad-w4a8-pq-em", "quant-w8a8-direct"])
    names = list(sel)
    # the score job pulls its whole chain: eval, the student, the PQ teacher, calibration, CAD images, refstats,
    # and the FP32 evaluation FID-to-FP32 needs; nothing else
    assert set(names) == {"score-cad-w4a8-pq-em", "eval-cad-w4a8-pq-em", "cad-w4a8-pq-em", "quant-w4a8-pq",
                          "calib-uniform", "cad-images", "refstats", "eval-fp32-100", "quant-w8a8-direct"}
    assert names[-1] == "quant-w8a8-direct"  # second pattern starts last
    assert scheduler.select_jobs(jobs, []) is jobs
    with pytest.raises(SystemExit, match="matches no job"):
        scheduler.select_jobs(jobs, ["quant-w2a2-*"])


def test_sampling_does_not_wait_for_fid_weights_but_scoring_does():
    jobs = graph.build_jobs(graph.PLANS["gpu"], timing=False)
    assert jobs["eval-quant-w4a8-pq"].deps == ["quant-w4a8-pq"]
    assert "eval-fp32-100" in jobs["score-quant-w4a8-pq"].deps and jobs["eval-fp32-100"].deps == []
    assert all(j.params.get("images", "cad-images") in j.deps for j in jobs.values() if j.kind == "cad")


def test_eval_waits_for_weights_after_sampling_without_failing(tmp_path):
    import numpy as np

    d = tmp_path / "jobs" / "eval-fp32-100"
    d.mkdir(parents=True)
    np.save(d / "images.npy", np.zeros((4, 1, 32, 32), np.uint8))
    (d / "sampled.json").write_text(json.dumps({"samples": 4, "steps": 100, "sampling_seconds": 0.1}))
    rc = cli.main(["job", "--work", str(tmp_path), "--plan", "smoke", "--weights", str(tmp_path / "none.pt"),
                       "eval-fp32-100"])
    assert rc == job_bodies.WAITING_RC
    assert scheduler.job_state(tmp_path, "eval-fp32-100") == "todo"  # neither done nor failed; its process has ended
    args = type("A", (), {"work": str(tmp_path), "weights": str(tmp_path / "none.pt")})
    assert not scheduler.inputs_ready(graph.Job("eval-fp32-100", "eval"), args)  # sampled: needs the weights now
    assert scheduler.inputs_ready(graph.Job("eval-fp32-50", "eval"), args)      # not sampled yet: may start


def test_job_started_by_another_live_scheduler_is_not_started_again(tmp_path):
    import os

    d = tmp_path / "jobs" / "quant-w4a8-pq"
    d.mkdir(parents=True)
    (d / "pid").write_text(str(os.getpid()))
    assert scheduler.job_state(tmp_path, "quant-w4a8-pq") == "elsewhere"
    (d / "pid").write_text("999999999")
    assert scheduler.job_state(tmp_path, "quant-w4a8-pq") == "todo"


def test_scheduler_records_its_own_pid_before_doing_anything(tmp_path):
    """results_device.sh tells a live scheduler by this file (in run 6 the shell's `$!` of it did not work)."""
    import os

    rc = cli.main(["run", "--work", str(tmp_path / "w"), "--plan", "smoke", "--until", "1e-9",
                       "--only", "quant-w4a8-pq"])
    assert rc == 0
    assert (tmp_path / "w" / "scheduler.pid").read_text() == str(os.getpid())
    assert not (tmp_path / "w" / "jobs").exists()  # the deadline passed before any job started


def test_tables_merge_runs_later_wins_but_keeps_earlier_done(tmp_path):
    run1 = {"score-fp32-100": {"status": "done", "fid": 7.04, "fid_to_fp32": 0.0, "sfid": 32.7, "precision": 0.6,
                               "recall": 0.7, "steps": 100},
            "quant-w4a8-direct": {"status": "done", "geomean_pert": 0.02}}
    run2 = {"quant-w4a8-direct": {"status": "done", "geomean_pert": 0.04},
            "score-fp32-100": {"status": "failed", "error": "no data"}}
    files = []
    for i, jobs in enumerate((run1, run2)):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps({"jobs": jobs}))
    md = tmp_path / "R.md"
    md.write_text("<!-- RESULTS-TABLES -->\n<!-- /RESULTS-TABLES -->\n")
    assert cli.main(["tables", "--results", *map(str, files), "--md", str(md)]) == 0
    text = md.read_text()
    assert "| FP32, 100 steps | 7.04 |" in text and "no data" not in text
    assert "| w4a8 | 0.04000 |" in text


def test_only_does_not_rerun_what_a_finished_job_needed():
    jobs = graph.build_jobs(graph.PLANS["smoke"], timing=False)
    sel = scheduler.select_jobs(jobs, ["eval-cad-w4a8-pq-em"], is_done=lambda n: n == "cad-w4a8-pq-em")
    assert set(sel) == {"eval-cad-w4a8-pq-em", "cad-w4a8-pq-em"}  # no calibration, CAD images or quantization


def test_cad_variants_get_their_overrides_and_others_keep_the_defaults():
    from types import SimpleNamespace

    jobs = graph.build_jobs(graph.PLANS["smoke"], timing=False)
    ctx = SimpleNamespace(plan=graph.PLANS["smoke"])
    lam10 = jobs["cad-w4a8-pq-em-lam10"]
    assert lam10.deps == ["quant-w4a8-pq", "calib-uniform", "cad-images"]
    cfg = job_bodies.cad_config(ctx, lam10.params["loss"], lam10.params.get("overrides"))
    assert cfg.lam == 10.0 and cfg.calib_loss == "em"
    plain = jobs["cad-w4a8-pq-em"]
    assert job_bodies.cad_config(ctx, plain.params["loss"], plain.params.get("overrides")).lam == 1.0
    assert job_bodies.cad_config(ctx, plain.params["loss"], plain.params.get("overrides")).kd_teacher == "quantized"
    for bits in ("w8a8", "w4a8"):
        fpkd = jobs[f"cad-{bits}-pq-em-fpkd"]
        cfg = job_bodies.cad_config(ctx, fpkd.params["loss"], fpkd.params.get("overrides"))
        assert cfg.kd_teacher == "fp" and cfg.calib_loss == "em" and fpkd.params["quant"] == f"quant-{bits}-pq"
    for loss in ("em", "none"):  # the second CAD seed: only the seed differs from the first
        one, two = jobs[f"cad-w4a8-pq-{loss}"], jobs[f"cad-w4a8-pq-{loss}-seed1"]
        c1 = job_bodies.cad_config(ctx, one.params["loss"], one.params.get("overrides"))
        c2 = job_bodies.cad_config(ctx, two.params["loss"], two.params.get("overrides"))
        assert (c1.seed, c2.seed) == (0, 1) and c2.with_overrides(seed=0) == c1
        # its training images come from their own job, drawn with its seed (distill() would redraw on a mismatch)
        imgs = jobs[two.params["images"]]
        assert two.deps == [*one.deps[:2], imgs.name] and imgs.kind == "cad_images"
        assert job_bodies.cad_config(ctx, "em", imgs.params.get("overrides")).seed == c2.seed
    assert jobs["cad-w8a8-pq-kl"].params == {"quant": "quant-w8a8-pq", "loss": "kl"}
    assert "eval-cad-w8a8-pq-em-lam10" in jobs and "score-cad-w8a8-pq-kl" in jobs
    fp = jobs["cad-fp32"]  # the FP32 Distill-only row: no quantized teacher, no calibration set
    assert fp.kind == "cad_fp" and fp.deps == ["cad-images"] and job_bodies.cad_config(ctx, "none").calib_loss == "none"
    assert jobs["eval-cad-fp32"].params["type"] == "fp_dir" and jobs["eval-cad-fp32"].params["steps"] == 50
    pcr = jobs["cad-w4a8-pq-pcr-em"]  # PQCAD on the PCR-calibrated teacher
    assert pcr.deps == ["quant-w4a8-pq-pcr", "calib-uniform", "cad-images"] and pcr.params["quant"] == pcr.deps[0]


def test_collect_keeps_rows_of_jobs_outside_this_runs_selection(tmp_path):
    # an --only run writes plan.json with its selection; collect must still report the work dir's earlier rows
    work = tmp_path / "w"
    for name, fid in (("score-quant-w4a8-pq-pcr", 35.5), ("score-cad-w8a8-pq-kl", 32.0)):
        (work / "jobs" / name).mkdir(parents=True)
        (work / "jobs" / name / "done.json").write_text(json.dumps({"fid": fid}))
    (work / "jobs" / "score-fp32-50").mkdir()  # started, never finished: not a row
    (work / "plan.json").write_text(json.dumps({"plan": {"name": "gpu"}, "jobs": ["score-quant-w4a8-pq-pcr"]}))
    assert cli.main(["collect", "--work", str(work), "--out", str(tmp_path / "c")]) == 0
    got = json.loads((tmp_path / "c" / "results.json").read_text())["jobs"]
    assert got == {"score-quant-w4a8-pq-pcr": {"status": "done", "fid": 35.5},
                   "score-cad-w8a8-pq-kl": {"status": "done", "fid": 32.0}}


def test_collect_copies_each_jobs_own_log(tmp_path):
    work = tmp_path / "w"
    for name, files in (("quant-w4a8-pq", {"quant_log.json": "q"}),
                        ("cad-w4a8-pq-em", {"quant_log.json": "teacher's", "cad_log.json": "c"})):
        (work / "jobs" / name).mkdir(parents=True)
        for f, text in files.items():
            (work / "jobs" / name / f).write_text(json.dumps(text))
    (work / "plan.json").write_text(json.dumps({"plan": {"name": "gpu"}, "jobs": ["quant-w4a8-pq"]}))
    assert cli.main(["collect", "--work", str(work), "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "quant-w4a8-pq.log.json").read_text()) == "q"
    assert json.loads((tmp_path / "c" / "cad-w4a8-pq-em.log.json").read_text()) == "c"


def test_sample_grid_has_the_headline_rows_then_the_other_students(tmp_path):
    work = tmp_path / "w"
    for row in ("cad-w4a8-pq-kl", "fp32-100", "cad-w4a8-pq-em"):
        (work / "jobs" / f"eval-{row}").mkdir(parents=True)
        np.save(work / "jobs" / f"eval-{row}" / "images.npy", np.zeros((12, 1, 28, 28), np.uint8))
    (work / "plan.json").write_text(json.dumps({"plan": {"name": "gpu"}, "jobs": []}))
    assert cli.main(["collect", "--work", str(work), "--out", str(tmp_path / "c")]) == 0
    rows = json.loads((tmp_path / "c" / "samples_rows.json").read_text())["rows_top_to_bottom"]
    assert rows == ["fp32-100", "cad-w4a8-pq-em", "cad-w4a8-pq-kl"]
    assert (tmp_path / "c" / "samples_rows.png").stat().st_size > 0
