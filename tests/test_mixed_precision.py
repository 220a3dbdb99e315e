"""Mixed-precision plan, sensitivity, RTN floor and `rtn` method, and the plan through export / lint / ORT / CAD
(tiny seeded UNets, CPU)."""

from __future__ import annotations

import collections
import hashlib
import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from pqcad_export.bits import parse_bits
from pqcad_export.cli import main
from pqcad_export.errors import UsageError
from pqcad_export.model_io import load_model
from pqcad_export.quantize import ReconConfig, load_quantized, quantize_model, save_quantized
from pqcad_export.quantize.plan import MixedPrecision, MixedPrecisionPlan, PlanConfig, decide_plan
from pqcad_export.quantize.capture import collect_calibration
from pqcad_export.quantize.sensitivity import measure_sensitivity


def _batches(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"sample": torch.randn(n, 1, 16, 16, generator=g), "timestep": torch.randint(0, 1000, (n,), generator=g)}]


def _cfg(**kw):
    base = dict(iters=6, act_iters=3, batch_size=4, max_calib=16, progress=False)
    base.update(kw)
    return ReconConfig.preset("quick", **base)


@pytest.fixture(scope="module")
def lm(tiny_attn_unet_dir):
    torch.set_num_threads(1)
    return load_model(tiny_attn_unet_dir)


@pytest.fixture(scope="module")
def planned(lm, tmp_path_factory):
    """W4A8 with a generous plan (so it picks several layers), saved and exported."""
    from pqcad_export.export.stage import export_quantized

    qm = quantize_model(lm, _batches(), "w4a8", "direct", _cfg(mixed_precision="auto", fp_budget=0.3,
                                                               w8_budget=0.3))
    d = tmp_path_factory.mktemp("planned")
    save_quantized(qm, d / "quant")
    res = export_quantized(d / "quant", d / "export" / "unet.onnx")
    return qm, d, res


def test_plan_respects_budgets_and_is_deterministic(lm):
    calib = collect_calibration(_batches(), torch.device("cpu"))
    bits = parse_bits("w4a8")
    docs = [measure_sensitivity(lm.unet, calib, bits) for _ in range(2)]
    assert docs[0] == docs[1]
    for fb, wb in ((0.0, 0.0), (0.1, 0.2), (0.3, 0.5)):
        p = decide_plan(docs[0], PlanConfig("auto", fb, wb), 8, True)
        base_fp = sum(L["macs"] for L in docs[0]["layers"] if not L["act_quant_default"]) / docs[0]["total_macs"]
        assert p.fp_mac_fraction <= max(fb, base_fp) + 1e-12
        assert p.w8_weight_fraction <= max(wb, 0.0) + 0.05  # conv_in/conv_out (8-bit by default) are tiny
        assert p.to_dict() == decide_plan(docs[0], PlanConfig("auto", fb, wb), 8, True).to_dict()
        assert MixedPrecisionPlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    big = decide_plan(docs[0], PlanConfig("auto", 0.3, 0.3), 8, True)
    assert big.fp_act_layers and big.w8_layers
    off = decide_plan(None, PlanConfig("off"), 8, True)
    assert off.mode is MixedPrecision.OFF and not off.fp_act_layers and not off.w8_layers
    with pytest.raises(UsageError):
        PlanConfig("auto", 1.5)
    with pytest.raises(UsageError):
        PlanConfig("sometimes")


def test_sensitivity_and_quant_json_round_trip(planned, lm):
    qm, d, _ = planned
    sens = json.loads((d / "quant" / "sensitivity.json").read_text())
    assert (d / "quant" / "sensitivity.png").stat().st_size > 1000
    L = sens["layers"][0]
    for k in ("name", "macs", "mac_share", "bops", "weight_bytes", "act_sensitivity", "weight_sensitivity",
              "act_sensitivity_exact"):
        assert k in L
    assert abs(sum(x["mac_share"] for x in sens["layers"]) - 1) < 1e-9
    assert any(x["act_sensitivity_exact"] is not None for x in sens["layers"])
    back = load_quantized(d / "quant")
    mp = back.meta["mixed_precision"]
    assert mp == json.loads(json.dumps(qm.meta["mixed_precision"]))
    plan = MixedPrecisionPlan.from_dict(mp)
    assert plan.fp_mac_fraction <= 0.3 and plan.bops > 0 and 4 < plan.avg_act_bits < 16
    mods = dict(back.unet.named_modules())
    for name in plan.fp_act_layers:
        assert not mods[name].act_quant_enabled and plan.layers[name]["act"] == "fp"
    for name in plan.w8_layers:
        assert mods[name].weight_bits == 8 and plan.layers[name]["weight_bits"] == 8
        assert int(mods[name].weight_int().abs().max()) > 8  # really on the 8-bit grid
    ints = [n for n, p in plan.layers.items() if p["act"] != "fp"]
    assert ints and all(mods[n].act_quant_enabled for n in ints)


def _qdq_fed(model, node_name):
    prod = {o: n for n in model.graph.node for o in n.output}
    n = next(x for x in model.graph.node if x.name == node_name)
    p = prod.get(n.input[0])
    return p is not None and p.op_type == "DequantizeLinear" and prod.get(p.input[0]) is not None \
        and prod[p.input[0]].op_type == "QuantizeLinear"


def test_export_has_no_qdq_on_fp_layers_lint_and_parity(planned):
    from pqcad_export.export.lint import EXPECT_KEY, lint_model

    qm, d, res = planned
    assert res.lint["ok"] and res.parity["ok"], (res.lint, res.parity)
    model = onnx.load(str(res.onnx))
    exp = json.loads({p.key: p.value for p in model.metadata_props}[EXPECT_KEY])
    fp = set(qm.meta["mixed_precision"]["fp_act_layers"])
    assert fp <= set(res.lint["stats"]["float_input_layers"])
    for e in exp:
        base = e["layer"].rsplit(".part", 1)[0]
        if base in fp:
            assert e["float_act"] == [0] and e["act"] == [] and not _qdq_fed(model, e["node"])
        elif e.get("act"):
            assert _qdq_fed(model, e["node"])
    # a planned FP input that is quantized fails lint: give one FP node a Q/DQ pair
    e = next(x for x in exp if x["layer"].rsplit(".part", 1)[0] in fp)
    node = next(n for n in model.graph.node if n.name == e["node"])
    sc = onnx.numpy_helper.from_array(torch.tensor(0.05).numpy(), "t_s")
    zp = onnx.numpy_helper.from_array(torch.tensor(0, dtype=torch.int8).numpy(), "t_zp")
    model.graph.initializer.extend([sc, zp])
    src = node.input[0]
    q = onnx.helper.make_node("QuantizeLinear", [src, "t_s", "t_zp"], ["t_q"], name="t_Q")
    dq = onnx.helper.make_node("DequantizeLinear", ["t_q", "t_s", "t_zp"], ["t_dq"], name="t_DQ")
    node.input[0] = "t_dq"
    nodes = list(model.graph.node)
    i = nodes.index(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes[:i] + [q, dq] + nodes[i:])
    rep = lint_model(model)
    assert "expected-float" in rep.rules_failed()
    # an expectation record that disagrees with the recorded plan fails the plan check
    m3 = onnx.load(str(res.onnx))
    props = {p.key: p for p in m3.metadata_props}
    bad = [dict(x, act=[0], float_act=[]) if x["node"] == e["node"] else x for x in exp]
    props[EXPECT_KEY].value = json.dumps(bad)
    assert "plan" in lint_model(m3).rules_failed()
    # ... and a planned integer input without its Q/DQ fails too
    m2 = onnx.load(str(res.onnx))
    e2 = next(x for x in exp if x.get("act") and x["op"] == "Conv")
    n2 = next(n for n in m2.graph.node if n.name == e2["node"])
    prod = {o: n for n in m2.graph.node for o in n.output}
    n2.input[0] = prod[prod[n2.input[0]].input[0]].input[0]  # bypass Q -> DQ
    assert "expected-quantized" in lint_model(m2).rules_failed()


def test_ort_engine_runs_fp_layers_on_float_kernels(planned, tmp_path):
    from engines.onnxruntime import OrtEngine, build_ort_engine

    qm, d, res = planned
    info = build_ort_engine(res.onnx, tmp_path / "eng")
    prec = json.loads((tmp_path / "eng" / "engine.json").read_text())["precision"]
    fp = set(qm.meta["mixed_precision"]["fp_act_layers"])
    assert fp <= set(prec["float_layer_names"]) and prec["float_layers"] == len(prec["float_layer_names"])
    n_layers = len([n for n, s in qm.meta["layers"].items() if s["kind"] != "attn"])
    assert prec["int_layers"] + prec["float_layers"] == n_layers
    assert prec["n_float_compute"] >= 1 and info.backend == "onnxruntime"
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        ref = qm(x, t)
    got = OrtEngine(tmp_path / "eng")(x, t)
    assert float((got - ref).norm() / ref.norm()) < 0.1  # u8 requant of conv outputs is the only difference


def test_compare_precision_summary(planned):
    from pqcad_export.pipeline.compare import PRECISION_KEYS, precision_summary

    qm, d, _ = planned
    ps = precision_summary(json.loads((d / "quant" / "quant.json").read_text()))
    assert set(PRECISION_KEYS) <= set(ps)
    mp = qm.meta["mixed_precision"]
    assert ps["float_layers"] == sum(1 for p in mp["layers"].values() if p["act"] == "fp") >= len(mp["fp_act_layers"])
    assert ps["bops"] == mp["bops"] and ps["avg_act_bits"] == mp["avg_act_bits"]


def test_cad_student_keeps_plan(planned):
    from pqcad_export.distill.student import freeze_student, prepare_student
    from pqcad_export.quantize.wrap import layer_specs

    qm, d, _ = planned
    teacher = load_quantized(d / "quant").unet
    student = freeze_student(prepare_student(teacher))
    assert layer_specs(student) == layer_specs(teacher)
    mods = dict(student.named_modules())
    assert all(not mods[n].act_quant_enabled for n in qm.meta["mixed_precision"]["fp_act_layers"])


# pre-change graph (main at b619622): tiny attention UNet, direct, iters 4 / act 2, batch 4, 8 rows; less the 8
# Slice nodes of the split skip-concat convs, which the export now feeds from the concat inputs directly (exact)
OFF_BASELINE = {
    "w8a8": ("ce5d0c7e537d1b70", {"Add": 71, "Cast": 42, "Concat": 47, "ConstantOfShape": 1, "Conv": 29, "Cos": 1,
                                  "DequantizeLinear": 124, "Div": 28, "Gather": 65, "InstanceNormalization": 21,
                                  "MatMul": 34, "Mul": 66, "QuantizeLinear": 69, "Reshape": 82, "Resize": 1,
                                  "Shape": 86, "Sigmoid": 19, "Sin": 1, "Slice": 2, "Softmax": 4, "Transpose": 28,
                                  "Unsqueeze": 142}),
    "w4a8": ("3424a584cf5494d3", {"Add": 71, "Cast": 22, "Concat": 31, "ConstantOfShape": 1, "Conv": 29, "Cos": 1,
                                  "DequantizeLinear": 108, "Div": 20, "Gather": 25, "InstanceNormalization": 21,
                                  "MatMul": 34, "Mul": 58, "QuantizeLinear": 53, "Reshape": 66, "Resize": 1,
                                  "Shape": 50, "Sigmoid": 19, "Sin": 1, "Slice": 6, "Softmax": 4, "Sqrt": 12,
                                  "Transpose": 28, "Unsqueeze": 78}),
}


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_mixed_precision_off_is_the_pre_change_graph(lm, bits, tmp_path):
    from pqcad_export.export.onnx import export_unet

    g = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(8, 1, 16, 16, generator=g),
                "timestep": torch.randint(0, 1000, (8,), generator=g)}]
    cfg = ReconConfig.preset("quick", iters=4, act_iters=2, batch_size=4, max_calib=8, progress=False,
                             attn_matmul_quant=(bits == "w8a8"), mixed_precision="off")
    qm = quantize_model(lm, batches, bits, "direct", cfg)
    save_quantized(qm, tmp_path / "q")
    layers = json.loads((tmp_path / "q" / "quant.json").read_text())["layers"]
    assert not (tmp_path / "q" / "sensitivity.json").exists()
    export_unet(qm.unet, tmp_path / "u.onnx")
    ops = dict(sorted(collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "u.onnx")).graph.node).items()))
    want_hash, want_ops = OFF_BASELINE[bits]
    assert hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16] == want_hash
    assert ops == want_ops


def test_floor_holds_when_learning_fails(lm):
    """A learning rate of 1e4 wrecks AdaRound; every block must still end no worse than its RTN start."""
    qm = quantize_model(lm, _batches(32), "w4a8", "direct", _cfg(iters=30, w_lr=1e4, max_calib=32, act_iters=0,
                                                                 round_weight=0.0))
    units = [u for u in qm.log["units"] if "heldout_rtn" in u]
    assert units and qm.log["floor_used_blocks"]
    for u in units:
        assert u["heldout_final"] <= u["heldout_rtn"] * (1 + 1e-9) + 1e-12, u["name"]
        assert u["floor_used"] == (u["heldout_learned"] > u["heldout_rtn"])


def test_rtn_method_learns_nothing(lm):
    qm = quantize_model(lm, _batches(), "w4a8", "rtn", _cfg())
    assert not qm.log["floor_used_blocks"]
    for u in qm.log["units"]:
        if "heldout_rtn" in u:
            assert u["heldout_learned"] == u["heldout_rtn"] and not u.get("curve")


def test_cli_rejects_bad_budgets(tmp_path):
    r = CliRunner().invoke(main, ["build", "--bits", "w4a8", "--out", str(tmp_path / "r"), "--fp-budget", "1.5"])
    assert r.exit_code == 2 and "--fp-budget" in r.output and not (tmp_path / "r").exists()
    r = CliRunner().invoke(main, ["quantize", "--calib", str(tmp_path), "--bits", "w4a8", "--out",
                                  str(tmp_path / "q"), "--w8-budget", "-0.1"])
    assert r.exit_code == 2 and "--w8-budget" in r.output


def test_rtx_build_shows_planned_layers_as_float(planned, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed")
    from engines.tensorrt import TrtConfig, build_trt_engine

    qm, d, res = planned
    exp = json.loads({p.key: p.value for p in onnx.load(str(res.onnx)).metadata_props}["pqcad.expect"])
    info = build_trt_engine(res.onnx, tmp_path / "eng", TrtConfig(compute_capability="SM89", max_batch=4,
                                                                  opt_batch=2), "tensorrt-rtx")
    counts = info.precision["quantized_layers"]
    fp_nodes = [e for e in exp if e.get("float_act")]
    assert len(fp_nodes) > 2  # the plan's layers besides conv_in / conv_out
    # float also counts the 8 attention matmuls (attention matmul quantization is off here)
    assert counts["int8"] == len(exp) - len(fp_nodes) and counts["float"] == len(fp_nodes) + 8, counts
