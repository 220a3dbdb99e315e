"""Reconstruction settings: the method, loss and activation-init choice sets, `PQConfig` and `ReconConfig`.

`ReconConfig.key_dict()` is part of the resume key of checkpoints (progress.json) and of the build's quant stage:
its content must stay stable across releases (fields added later enter it only when set off their default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any, ClassVar, Optional

from ..config_base import ConfigBase, parse_choice, require
from ..errors import UsageError
from .plan import DEFAULT_FP_BUDGET, DEFAULT_W8_BUDGET, MixedPrecision, PlanConfig


class Method(str, Enum):
    """Weight schedules; `rtn` learns nothing (round-to-nearest + MSE scales, the baseline the floor guards)."""

    DIRECT = "direct"
    PQ = "pq"
    BITSHRINK = "bitshrink"
    RTN = "rtn"


METHODS = tuple(m.value for m in Method)


class ReconLoss(str, Enum):
    """`block`: BRECQ's block-output loss; `fbr`: plus gamma * layer-wise losses (EDA-DM, fbr.py)."""

    BLOCK = "block"
    FBR = "fbr"


class ActInit(str, Enum):
    """How activation steps are initialised from data before LSQ."""

    MSE = "mse"
    PERCENTILE = "percentile"


@dataclass
class PQConfig:
    """Progressive Quantization (paper Alg. 3) hyper-parameters; defaults are the paper's."""

    pi: float = 0.04            # fire when the relative gap |L_avg - G| / max(L_avg, eps) < pi
    beta: float = 0.9           # momentum of G
    eps: float = 1e-8
    window: int = 500           # W: number of recent losses averaged into L_avg
    force_fraction: float = 0.5  # transition forced at this fraction of the weight budget
    sync_every: int = 0         # detector reads losses every n iterations (0: 1 on CPU, 25 on GPU)


@dataclass
class ReconConfig(ConfigBase):
    """Block reconstruction settings. `preset("paper")`: 20k AdaRound iterations per block, batch 32."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Sized so the built-in 2.2M-param teacher finishes W4A8 in a few minutes on 2 CPU cores.
        "quick": dict(iters=160, act_iters=40, batch_size=8, w_lr=5e-2, a_lr=1e-3, fisher=False,
                      capture_batch_size=32, max_calib=128, pq=dict(window=20, force_fraction=0.5)),
        "paper": {},
    }
    OPTIONS: ClassVar[str] = "reconstruction"

    iters: int = 20000          # weight (AdaRound) iterations per block: the budget PQ splits between tau and kappa
    act_iters: int = 5000       # LSQ iterations per block (BRECQ's default)
    batch_size: int = 32
    w_lr: float = 1e-3          # Adam on AdaRound alpha
    a_lr: float = 4e-5          # Adam on LSQ steps (cosine decay)
    round_weight: float = 0.01  # lambda of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2         # fraction of a segment without the regulariser before beta annealing starts
    fisher: bool = True         # weight the output MSE by squared gradients (Eq. 5)
    qdrop_prob: float = 0.0     # QDrop: keep each activation in FP with this probability during LSQ
    recon_loss: ReconLoss = ReconLoss.BLOCK
    fbr_gamma: float = 0.8      # EDA-DM's CIFAR-10 DDIM setting (official scripts, --add_loss 0.8)
    act_init: ActInit = ActInit.MSE
    attn_matmul_quant: bool = False  # also quantize q, k, v and softmax output of attention
    first_last_bits: Optional[int] = 8
    io_act_quant: bool = False  # also quantize the inputs of conv_in (x_t) and conv_out (wrap.py says why not)
    capture_batch_size: int = 64
    max_calib: Optional[int] = None  # use at most this many calibration inputs
    seed: int = 0
    progress: bool = True
    pq: PQConfig = field(default_factory=PQConfig)
    bitshrink_stages: int = 0   # 0: one stage per bit from tau down to kappa
    curve_unit: Optional[str] = None  # unit whose loss curve is plotted (default: first with a transition)
    mixed_precision: str = "off"  # "auto": sensitivity-driven plan (plan.py); the CLI's default is auto
    fp_budget: float = DEFAULT_FP_BUDGET  # max fraction of conv/linear MACs with FP inputs (auto)
    w8_budget: float = DEFAULT_W8_BUDGET  # max fraction of conv/linear weights kept at 8 bits (auto, K < 8)
    floor_holdout: float = 0.125  # calibration rows held out per block for the RTN floor (floor.py); 0 = off

    def with_overrides(self, **overrides: Any) -> "ReconConfig":
        """Replace fields, None values included: `first_last_bits=None` (no 8-bit first/last layers) and
        `max_calib=None` (all rows) are settings here, not "unset"."""
        names = {f.name for f in fields(self)}
        bad = [k for k in overrides if k not in names]
        if bad:
            raise UsageError(f"unknown {self.OPTIONS} option(s): {', '.join(bad)}")
        return replace(self, **overrides) if overrides else self  # replace() runs __post_init__ (validate)

    def __post_init__(self) -> None:
        if isinstance(self.pq, dict):  # from JSON (e.g. PCR's stored pcr_recon overrides)
            try:
                self.pq = PQConfig(**self.pq)
            except TypeError as exc:
                raise UsageError(f"bad PQ settings {self.pq}: {exc}") from None
        self.validate()

    def validate(self) -> None:
        self.recon_loss = parse_choice(ReconLoss, self.recon_loss, "--recon-loss")
        self.act_init = parse_choice(ActInit, self.act_init, "act_init")
        require(self.fbr_gamma >= 0, f"--fbr-gamma must be >= 0, got {self.fbr_gamma}")
        require(0.0 <= self.qdrop_prob <= 1.0, f"--qdrop must be in [0, 1], got {self.qdrop_prob}")
        self.mixed_precision = self.plan_config().mode.value
        require(0.0 <= self.floor_holdout < 1.0, f"floor_holdout must be in [0, 1), got {self.floor_holdout}")

    def plan_config(self) -> PlanConfig:
        return PlanConfig(self.mixed_precision, self.fp_budget, self.w8_budget)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, choices as their plain string values."""
        d = asdict(self)
        d["recon_loss"], d["act_init"] = self.recon_loss.value, self.act_init.value
        return d

    def key_dict(self) -> dict[str, Any]:
        """The settings that change the result: the resume key of checkpoints and the build's quant stage.
        Display-only fields are left out, and optional features enter only when on (keys of older runs hold)."""
        d = self.to_dict()
        d.pop("progress", None)
        d.pop("curve_unit", None)
        if d.get("recon_loss") == ReconLoss.BLOCK.value:  # keep keys of plain block reconstruction unchanged
            d.pop("recon_loss", None)
            d.pop("fbr_gamma", None)
        if d.get("mixed_precision") == MixedPrecision.OFF.value:  # the plan enters the key only when on
            for k in ("mixed_precision", "fp_budget", "w8_budget"):
                d.pop(k, None)
        return d
