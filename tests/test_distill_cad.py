"""CAD end to end on a tiny quantized UNet (CPU, seeded): loss goes down, the student stays on the teacher's
integer grid and saves as a 50-step quantized model, interrupt + resume equals an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from calibration import CalibConfig, collect_cdc
from pqcad_export.distill import CadConfig, distill, distill_fp, load_cdc, prepare_student, run_cad, student_grid
from pqcad_export.distill.student import LatentGridWeight, max_grid_error
from pqcad_export.errors import PqcadError
from pqcad_export.model_io import load_model
from pqcad_export.quantize import ReconConfig, load_quantized, quantize_model, save_quantized
from pqcad_export.sampling import SamplerConfig, ddim_sample


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs are fastest (and least disturbed by a busy machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tiny_unet_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cad")
    lm = load_model(tiny_unet_dir)
    g = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(16, 1, 16, 16, generator=g),
                "timestep": torch.randint(0, 1000, (16,), generator=g)}]
    qm = quantize_model(lm, batches, "w4a8", "direct",
                        ReconConfig.preset("quick", iters=2, act_iters=2, progress=False))
    qdir = save_quantized(qm, root / "quant")
    collect_cdc(lm, CalibConfig.preset("quick", dc_trajectories=4, dc_size=100, batch_size=4),
                root / "calib" / "c_dc", quiet=True)
    return {"root": root, "quant": qdir, "calib": root / "calib", "model": tiny_unet_dir}


def quick(**kw) -> CadConfig:
    base = dict(iters=6, batch_size=2, n_train_images=4, eval_images=2, eval_steps=2, checkpoint_every=2,
                log_every=2, cdc_batch=2, gap_samples=0)
    base.update(kw)
    return CadConfig.preset("quick", **base)


def test_few_iterations_lower_the_loss(setup):
    q = load_quantized(setup["quant"])
    cdc = load_cdc(setup["calib"], student_grid(q.scheduler_config)[1])
    assert cdc.count == 100 and len(cdc.by_t) == 50
    imgs = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    res = run_cad(q.unet, q.scheduler_config, cdc, quick(iters=16, lr=3e-4, lr_act=3e-4), imgs)
    before, after = res.log["eval_before"], res.log["eval_after"]
    assert after["loss"] < before["loss"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.log["history"])
    # the frozen teacher was not touched by training its copy
    q2 = load_quantized(setup["quant"])
    for (n1, a), (_, b) in zip(q.quant_layers(), q2.quant_layers()):
        assert torch.equal(a.weight_int(), b.weight_int()), n1


def test_fp_kd_teacher_takes_the_targets_from_the_fp_model(setup):
    from pqcad_export.distill.cad import _Trainer
    from pqcad_export.distill.targets import distillation_target
    from pqcad_export.sampling import TorchUNet

    q = load_quantized(setup["quant"])
    fp = load_model(setup["model"]).unet
    cdc = load_cdc(setup["calib"], student_grid(q.scheduler_config)[1])
    imgs = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dev = torch.device("cpu")
    kb = {}
    for who, kd_unet in (("quantized", None), ("fp", fp)):
        tr = _Trainer(q.unet, q.scheduler_config, cdc, quick(kd_teacher=who), imgs, dev, kd_unet=kd_unet)
        kb[who] = tr.batch(torch.Generator().manual_seed(5), 2, int(tr.grid[10]))
    assert torch.equal(kb["fp"].z, kb["quantized"].z)  # same noisy inputs, different targets
    assert not torch.allclose(kb["fp"].x_tilde, kb["quantized"].x_tilde)
    want, _, _ = distillation_target(TorchUNet(fp.eval()), tr.sched, kb["fp"].z,
                                     torch.full((2,), kb["fp"].t), 100)
    assert torch.allclose(kb["fp"].x_tilde, want)
    with pytest.raises(PqcadError, match="kd-teacher fp needs the FP model"):
        run_cad(q.unet, q.scheduler_config, cdc, quick(kd_teacher="fp"), imgs)


def test_student_stays_on_integer_grid_and_saves_as_50_steps(setup, tmp_path):
    q = load_quantized(setup["quant"])
    out = tmp_path / "student"
    st = distill(setup["quant"], setup["calib"], quick(iters=6, lr=2e-3, gap_samples=2), out, fp_model=setup["model"])
    assert st.steps == 50 and st.meta["distillation"]["method"] == "cad"
    re = load_quantized(out)
    assert re.steps == 50 and re.bits == q.bits
    changed = 0
    for (name, a), (_, b) in zip(q.quant_layers(), re.quant_layers()):
        wi = b.weight_int()
        lo, hi = -(2 ** (b.weight_bits - 1)), 2 ** (b.weight_bits - 1) - 1
        assert wi.dtype == torch.int8 and int(wi.min()) >= lo and int(wi.max()) <= hi, name
        assert torch.equal(b.weight_scale(), a.weight_scale()), f"{name}: the grid (delta) must stay the teacher's"
        d = b.weight_scale().reshape(-1, *([1] * (wi.dim() - 1)))
        assert torch.equal(b.weight, wi.float() * d), name
        changed += int((wi != a.weight_int()).sum())
    assert changed > 0, "training should move some weights to neighbouring integers"
    # the stored tensors are integers, and reload is bit-identical
    state = load_file(str(out / "quantized.safetensors"))
    assert any(k.endswith("wq.w_int") and v.dtype == torch.int8 for k, v in state.items())
    log = json.loads((out / "cad_log.json").read_text())
    assert log["cdc"]["rows"] == 100 and "data-free" in log["training_images"]
    assert not (out / "cad_checkpoint.pt").exists()
    gap = log["sample_gap_mse"]
    assert gap["n"] == 2 and set(gap["before"]) == {"teacher_100", "fp_100"} and set(gap["after"]) == set(gap["before"])
    # the 50-step student samples through the shared DDIM loop
    imgs = ddim_sample(re, re.scheduler_config, re.sample_shape, 2, SamplerConfig(steps=50, batch_size=2, seed=3))
    assert imgs.shape == (2, 1, 16, 16) and torch.isfinite(imgs).all()
    imgs2 = ddim_sample(st, st.scheduler_config, st.sample_shape, 2, SamplerConfig(steps=50, batch_size=2, seed=3))
    assert torch.equal(imgs, imgs2)


def test_interrupt_and_resume_equals_uninterrupted(setup, tmp_path):
    cfg = quick(iters=6, checkpoint_every=2, lr=1e-3)
    full = tmp_path / "full"
    distill(setup["quant"], setup["calib"], cfg, full, fp_model=setup["model"])

    part = tmp_path / "part"

    def interrupt(i):
        if i == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(setup["quant"], setup["calib"], cfg, part, fp_model=setup["model"], on_iter=interrupt)
    assert (part / "cad_checkpoint.pt").is_file() and not (part / "quant.json").exists()
    distill(setup["quant"], setup["calib"], cfg, part, fp_model=setup["model"])
    a, b = load_file(str(full / "quantized.safetensors")), load_file(str(part / "quantized.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = (json.loads((d / "cad_log.json").read_text()) for d in (full, part))
    assert lb["resumed_from"] == 4 and la["resumed_from"] is None
    assert la["history"] == lb["history"]


def test_nan_is_a_one_line_error(setup):
    q = load_quantized(setup["quant"])
    imgs = torch.full((2, 1, 16, 16), float("nan"))
    with pytest.raises(PqcadError, match="diverged"):
        run_cad(q.unet, q.scheduler_config, setup["calib"], quick(iters=2), imgs)


def test_plain_fp_module_gets_a_grid_and_ends_on_it(tiny_unet_dir):
    lm = load_model(tiny_unet_dir)
    ref = prepare_student(lm.unet, bits=8)
    assert max_grid_error(ref) < 1e-4
    deltas = {n: m.parametrizations.weight[0].delta for n, m in ref.named_modules()
              if isinstance(m, torch.nn.Conv2d)}
    imgs = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    res = run_cad(lm.unet, lm.scheduler_config, None, quick(iters=3, calib_loss="none", lr=1e-2), imgs)
    moved = 0
    for name, m in res.student.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            q = m.weight.detach() / deltas[name].reshape(-1, 1, 1, 1)
            assert torch.allclose(q, q.round(), atol=1e-3), name
            moved += int((q.round() != (ref.get_submodule(name).weight.detach()
                                        / deltas[name].reshape(-1, 1, 1, 1)).round()).sum())
    assert moved > 0
    assert not any(isinstance(x, LatentGridWeight) for x in res.student.modules())


def test_distill_only_fp_student_is_an_fp_diffusers_model_that_resumes(setup, tmp_path):
    # the "FP32 Distill-only" row: no grid (weights move off any integer grid), saved as a loadable diffusers dir
    cfg = quick(iters=6, checkpoint_every=2, lr=1e-3, n_train_images=2)
    full = tmp_path / "full"
    st = distill_fp(setup["model"], cfg, full)
    teacher = load_model(setup["model"])
    assert type(st.unet) is type(teacher.unet) and st.scheduler_config == teacher.scheduler_config
    meta = json.loads((full / "distillation.json").read_text())
    assert meta["steps"] == cfg.teacher_steps // 2 and meta["teacher_fingerprint"] == teacher.fingerprint
    log = json.loads((full / "cad_log.json").read_text())
    assert log["cdc"]["loss"] == "none" and log["cdc"]["rows"] == 0 and not (full / "cad_checkpoint.pt").exists()
    w0, w1 = teacher.unet.conv_in.weight, st.unet.conv_in.weight
    assert not torch.equal(w0, w1)
    amax = w1.reshape(w1.shape[0], -1).abs().amax(1).reshape(-1, 1, 1, 1)
    assert ((w1 / (amax / 127)) - (w1 / (amax / 127)).round()).abs().max() > 0.01  # not on an 8-bit grid

    part = tmp_path / "part"

    def interrupt(i):
        if i == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_fp(setup["model"], cfg, part, on_iter=interrupt)
    assert (part / "cad_checkpoint.pt").is_file() and not (part / "unet").exists()
    again = distill_fp(setup["model"], cfg, part)
    for k, v in st.unet.state_dict().items():
        assert torch.equal(v, again.unet.state_dict()[k]), k
    assert json.loads((part / "cad_log.json").read_text())["resumed_from"] == 4


def test_fp_student_needs_an_fp_teacher(setup):
    with pytest.raises(PqcadError, match="FP teacher"):
        prepare_student(load_quantized(setup["quant"]).unet, bits=None)


def test_load_cdc_sources_and_off_grid_rows(setup):
    _, grid = student_grid(load_quantized(setup["quant"]).scheduler_config)
    rows = {"sample": torch.zeros(3, 1, 4, 4), "timestep": torch.tensor([int(grid[0]), 5, int(grid[0])]),
            "x0_pred": torch.zeros(3, 1, 4, 4)}
    bank = load_cdc(rows, grid)
    assert bank.count == 2 and bank.ignored_rows == 1 and bank.rows(int(grid[0]))["sample"].shape[0] == 2
    bank2 = load_cdc(iter([{k: v[:1] for k, v in rows.items()}, {k: v[1:] for k, v in rows.items()}]), grid)
    assert bank2.count == 2
    with pytest.raises(PqcadError, match="grid"):
        load_cdc({"sample": torch.zeros(1, 1, 4, 4), "timestep": torch.tensor([5])}, grid)
    with pytest.raises(PqcadError):
        load_cdc(setup["root"] / "nowhere", grid)


def test_fp_training_images_are_shared_across_teachers_but_not_self_samples(setup, tmp_path):
    """FP samples do not depend on the quantized teacher (cache reused by another teacher's student); samples of
    the quantized teacher itself (no FP model) do."""
    from pqcad_export.distill import training_images
    from pqcad_export.distill.cad import FP_GIVEN

    q = load_quantized(setup["quant"])
    fp = load_model(setup["model"]).unet
    cfg = quick()
    imgs, _ = training_images(q, cfg, tmp_path, "cpu", fp, FP_GIVEN)
    marker = torch.full_like(imgs, 0.5)  # overwrite the cache: a reuse returns the marker, a redraw does not
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "cad_train_images.safetensors"), "pt") as fh:
        md = fh.metadata()
    save_file({"images": marker}, str(tmp_path / "cad_train_images.safetensors"), metadata=md)
    q.meta["fingerprint"] = "another-teacher"
    again, _ = training_images(q, cfg, tmp_path, "cpu", fp, FP_GIVEN)
    assert torch.equal(again, marker)
    own, _ = training_images(q, cfg, tmp_path, "cpu", None, "")
    assert not torch.equal(own, marker)
