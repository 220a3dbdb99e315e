"""Mixed-precision plan: which layers keep floating-point inputs (FP16 in TensorRT) and which keep 8-bit weights.

Chosen greedily from single-layer sensitivities (sensitivity.py) before block reconstruction and applied when the
UNet is wrapped, so reconstruction learns with the plan:
  * FP activations: by activation sensitivity per MAC, while all FP-input layers (conv_in / conv_out included)
    stay within `fp_budget` of the model's conv/linear MACs.
  * 8-bit weights (only when K < 8): by weight sensitivity per weight byte, while the weights kept at 8 bits
    (conv_in / conv_out included) stay within `w8_budget` of all conv/linear weights. A 4-bit grid runs on INT8
    kernels anyway, so this costs model size, not speed.
Default budgets, measured on the built-in teacher (static-scale fake quantization, nothing learned, 32 C_QC rows
of the quick preset not used by the sensitivity pass; eps MSE vs FP / mean(eps^2)):
  W8A8, fp_budget 0 / 0.02 / 0.05 / 0.08 / 0.10 -> 1.74e-4 / 1.13e-4 / 1.03e-4 / 0.89e-4 / 0.94e-4 (0.08 best);
  W4A8 (fp 0.08), w8_budget 0 / 0.10 / 0.25 / 0.35 -> 2.43e-3 / 5.1e-4 / 3.0e-4 / 2.2e-4; 0.25 keeps packed weights
  near 0.63x of W8 (5 bits on average), within the 0.7x goal with room for scales and biases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Optional

from ..errors import UsageError

DEFAULT_FP_BUDGET = 0.08
DEFAULT_W8_BUDGET = 0.25
FP_ACT_BITS = 16  # an FP-input layer runs in FP16 (TensorRT); BOPs count it as 16 x 16 bits


class MixedPrecision(str, Enum):
    AUTO = "auto"
    OFF = "off"


@dataclass
class PlanConfig:
    mode: MixedPrecision = MixedPrecision.AUTO
    fp_budget: float = DEFAULT_FP_BUDGET
    w8_budget: float = DEFAULT_W8_BUDGET

    def __post_init__(self) -> None:
        try:
            self.mode = MixedPrecision(self.mode)
        except ValueError:
            raise UsageError(f"unknown --mixed-precision '{self.mode}': expected auto or off") from None
        for flag, v in (("--fp-budget", self.fp_budget), ("--w8-budget", self.w8_budget)):
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise UsageError(f"{flag} must be in [0, 1], got {v}")
        self.fp_budget, self.w8_budget = float(self.fp_budget), float(self.w8_budget)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "fp_budget": self.fp_budget, "w8_budget": self.w8_budget}


@dataclass
class MixedPrecisionPlan:
    """The decided plan; `layers` maps every quantized layer to its {"weight_bits", "act"} ("int<A>" | "fp")."""

    mode: MixedPrecision
    fp_budget: float
    w8_budget: float
    fp_act_layers: list[str] = field(default_factory=list)   # chosen by the plan (beyond conv_in / conv_out)
    w8_layers: list[str] = field(default_factory=list)       # chosen by the plan
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    fp_mac_fraction: float = 0.0       # MACs of all FP-input layers / all conv+linear MACs
    w8_weight_fraction: float = 0.0    # weights at 8 bits / all conv+linear weights
    bops: Optional[int] = None         # sum MACs * w_bits * a_bits (FP-input layers 16 x 16), per image
    bops_fraction_of_fp16: Optional[float] = None
    avg_act_bits: Optional[float] = None  # MAC-weighted input bits (FP inputs count 16)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mode"] = self.mode.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MixedPrecisionPlan":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw["mode"] = MixedPrecision(kw.get("mode", "off"))
        return cls(**kw)


def _fill_costs(plan: MixedPrecisionPlan, sens: Optional[dict[str, Any]]) -> None:
    if not sens:
        return
    by = {L["name"]: L for L in sens["layers"]}
    macs = {n: by[n]["macs"] for n in plan.layers if n in by}
    total = sum(macs.values())
    if not total:
        return
    bops, act_bits_w = 0, 0.0
    for n, m in macs.items():
        p = plan.layers[n]
        a = FP_ACT_BITS if p["act"] == "fp" else int(p["act"][3:])
        w = FP_ACT_BITS if p["act"] == "fp" else p["weight_bits"]
        bops += m * w * a
        act_bits_w += m * a
    plan.fp_mac_fraction = sum(m for n, m in macs.items() if plan.layers[n]["act"] == "fp") / total
    params = {n: by[n]["weight_params"] for n in macs}
    plan.w8_weight_fraction = sum(v for n, v in params.items() if plan.layers[n]["weight_bits"] >= 8) / \
        max(1, sum(params.values()))
    plan.bops = int(bops)
    plan.bops_fraction_of_fp16 = bops / (total * FP_ACT_BITS * FP_ACT_BITS)
    plan.avg_act_bits = act_bits_w / total


def _act_sens(L: dict[str, Any]) -> float:
    """The exact single-layer measurement where one was made, else the probe estimate."""
    v = L.get("act_sensitivity_exact")
    return float(v if v is not None else (L.get("act_sensitivity") or 0.0))


def decide_plan(sens: Optional[dict[str, Any]], cfg: PlanConfig, act_bits: int, quantize_activations: bool
                ) -> MixedPrecisionPlan:
    """Greedy plan from a sensitivity document (None with mode off: every layer keeps its default precision)."""
    plan = MixedPrecisionPlan(cfg.mode, cfg.fp_budget, cfg.w8_budget)
    if sens is None:
        return plan
    layers = sens["layers"]
    fp = {L["name"] for L in layers if not L["act_quant_default"]}
    w8 = {L["name"] for L in layers if L["weight_bits"] >= 8}
    total_macs = sum(L["macs"] for L in layers) or 1
    total_w = sum(L["weight_params"] for L in layers) or 1
    if cfg.mode is MixedPrecision.AUTO and quantize_activations:
        used = sum(L["macs"] for L in layers if L["name"] in fp)
        cand = [L for L in layers if L["act_quant_default"] and _act_sens(L) > 0]
        cand.sort(key=lambda L: (-_act_sens(L) / max(L["macs"], 1), L["name"]))
        for L in cand:
            if used + L["macs"] <= cfg.fp_budget * total_macs:
                used += L["macs"]
                plan.fp_act_layers.append(L["name"])
        fp |= set(plan.fp_act_layers)
    if cfg.mode is MixedPrecision.AUTO:
        used = sum(L["weight_params"] for L in layers if L["name"] in w8)
        cand = [L for L in layers if L["weight_bits"] < 8 and (L["weight_sensitivity"] or 0) > 0]
        cand.sort(key=lambda L: (-L["weight_sensitivity"] / max(L["weight_bytes"], 1), L["name"]))
        for L in cand:
            if used + L["weight_params"] <= cfg.w8_budget * total_w:
                used += L["weight_params"]
                plan.w8_layers.append(L["name"])
        w8 |= set(plan.w8_layers)
    plan.fp_act_layers.sort()
    plan.w8_layers.sort()
    for L in layers:
        wb = 8 if L["name"] in w8 else L["weight_bits"]
        act = "fp" if (L["name"] in fp or not quantize_activations) else f"int{act_bits}"
        plan.layers[L["name"]] = {"weight_bits": wb, "act": act}
    _fill_costs(plan, sens)
    return plan


def plan_from_specs(specs: dict[str, dict[str, Any]], sens: Optional[dict[str, Any]], cfg: PlanConfig,
                    plan: Optional[MixedPrecisionPlan] = None) -> MixedPrecisionPlan:
    """Per-layer precision as the wrapped model really has it (quant.json 'layers'), with the plan's choices."""
    plan = plan or MixedPrecisionPlan(cfg.mode, cfg.fp_budget, cfg.w8_budget)
    plan.layers = {}
    for n, sp in specs.items():
        if sp.get("kind") == "attn":
            continue
        plan.layers[n] = {"weight_bits": sp["weight_bits"],
                          "act": f"int{sp['act_bits']}" if sp["act_quant"] else "fp"}
    _fill_costs(plan, sens)
    return plan


def plan_overrides(mode: str, fp_budget: Optional[float], w8_budget: Optional[float]) -> dict[str, Any]:
    """ReconConfig overrides for the CLI flags (validated here: a bad budget is a UsageError, exit 2)."""
    cfg = PlanConfig(mode, DEFAULT_FP_BUDGET if fp_budget is None else fp_budget,
                     DEFAULT_W8_BUDGET if w8_budget is None else w8_budget)
    return {"mixed_precision": cfg.mode.value, "fp_budget": cfg.fp_budget, "w8_budget": cfg.w8_budget}
