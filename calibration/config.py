"""Calibration configuration with paper defaults and a `quick` preset for a 2-core CPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from pqcad_export.bits import BitSpec, parse_bits
from pqcad_export.config_base import ConfigBase, Preset, choices, parse_choice, require
from pqcad_export.errors import UsageError

from .strategies import STRATEGIES, StrategyName


@dataclass(frozen=True)
class PcrConfig:
    """PCR's settings as typed values (the flat `pcr_*` fields of CalibConfig, parsed once)."""

    bits: BitSpec                 # the model quantized between stages
    stages: int                   # K contiguous stages from x_T to x_0
    method: str                   # quantize_model method between stages
    preset: Preset                # ReconConfig preset between stages
    recon: dict[str, Any]         # ReconConfig overrides between stages


@dataclass
class CalibConfig(ConfigBase):
    """What to collect for C_QC (quantization calibration) and C_DC (distillation calibration).

    Paper defaults follow Q-Diffusion's CIFAR-10 setting that PQ builds on: 100 DDIM steps, 256 FP trajectories,
    inputs kept at every 5th step -> 20 steps x 256 = 5120 samples (Q-Diffusion, Sec. 5.1). The same total
    budget is used for NDTC/TDAC so strategies are compared at equal size.
    """

    # -- C_QC ---------------------------------------------------------------------------------------------
    steps: int = 100                      # teacher DDIM steps T
    strategy: str = StrategyName.UNIFORM.value  # a StrategyName value (or a registered strategy's name)
    n_per_step: int = 256                 # uniform: samples kept at each selected step
    every_k: int = 5                      # uniform: keep every k-th step (1 = all steps)
    n_total: Optional[int] = None         # ndtc/tdac total budget; None = the uniform budget above
    ndtc_mean: float = 0.5                # NDTC: centre of the normal over steps, as a fraction of T (mid-way)
    ndtc_std: float = 0.25                # NDTC: its standard deviation, as a fraction of T
    tdac_density_weight: float = 0.5      # TDAC: weight of the density score (1 - it: variety score)
    tdac_candidates: int = 2              # TDAC: candidates per kept sample (trajectories = this x max n_t)
    n_trajectories: Optional[int] = None  # FP trajectories; None = what the strategy needs (max per-step count)
    eta: float = 0.0                      # C_QC trajectories: deterministic DDIM, as the deployed sampler runs
    batch_size: int = 64                  # trajectories run together through the UNet
    cond_tokens: int = 8                  # conditional UNets without a text encoder: random N(0,1) tokens
    shard_size: int = 1024                # rows per safetensors shard (~12 MB for 3x32x32)
    seed: int = 0
    # -- PCR progressive calibration (calibration/pcr.py, arXiv 2311.06322); only used by strategy "pcr" ----
    pcr_bits: Optional[BitSpec] = None    # the model quantized between stages (required for pcr); a 'wKaA'
    #                                       string is parsed on construction; serialised as its name
    pcr_stages: int = 4                   # K contiguous stages from x_T to x_0 (the paper's per-step: K = T)
    pcr_method: str = "pq"                # quantize_model method between stages
    pcr_preset: str = Preset.QUICK.value  # ReconConfig preset between stages
    pcr_recon: Optional[dict] = None      # ReconConfig overrides between stages
    # -- C_DC (paper Alg. 1 lines 8-9) ---------------------------------------------------------------------
    with_dc: bool = True
    dc_size: Optional[int] = None         # None = one per student step (T/2 = 50 for T=100), as in Alg. 1
    dc_stride: int = 2                    # keep every 2nd teacher step = the 50-step student's grid
    dc_trajectories: int = 64             # stochastic FP trajectories one sample per step is drawn from
    dc_eta: float = 1.0                   # fresh noise each step (DDPM-like), so samples cover p(z_t)

    # quick: 16 trajectories x 100 steps for C_QC (16 samples at every 5th step = 320 rows) and 4 stochastic
    # trajectories for C_DC (50 rows, one per student step): 2000 image-UNet calls, ~20 s at ~10 ms per call.
    PRESETS = {Preset.QUICK.value: dict(n_per_step=16, every_k=5, batch_size=16, shard_size=256, dc_trajectories=4,
                                        pcr_stages=2),
               Preset.PAPER.value: {}}
    OPTIONS = "calibration"

    def __post_init__(self) -> None:
        if isinstance(self.pcr_bits, str):  # parsed once, here: a bad 'wKaA' is a UsageError naming --bits
            self.pcr_bits = parse_bits(self.pcr_bits)

    def validate(self) -> None:
        require(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        require(self.strategy in STRATEGIES,
                f"unknown --strategy '{self.strategy}': expected one of {', '.join(STRATEGIES)}")
        require(self.n_per_step >= 1, f"--n-per-step must be >= 1, got {self.n_per_step}")
        require(self.every_k >= 1, f"--every-k must be >= 1, got {self.every_k}")
        require(self.n_total is None or self.n_total >= 1, f"--total must be >= 1, got {self.n_total}")
        require(self.ndtc_std > 0, f"ndtc_std must be > 0, got {self.ndtc_std}")
        require(0.0 <= self.tdac_density_weight <= 1.0, "tdac_density_weight must be in [0, 1]")
        require(self.tdac_candidates >= 1, "tdac_candidates must be >= 1")
        require(self.n_trajectories is None or self.n_trajectories >= 1, "n_trajectories must be >= 1")
        require(self.eta >= 0 and self.dc_eta >= 0, "eta must be >= 0")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        require(self.dc_stride >= 1, "dc_stride must be >= 1")
        require(self.dc_size is None or self.dc_size >= 1, f"--dc-size must be >= 1, got {self.dc_size}")
        require(self.dc_trajectories >= 1, f"--dc-trajectories must be >= 1, got {self.dc_trajectories}")
        if self.strategy == StrategyName.PCR:
            require(1 <= self.pcr_stages <= self.steps,
                    f"--pcr-stages must be in [1, {self.steps}], got {self.pcr_stages}")
            require(self.pcr_preset in choices(Preset), f"unknown pcr preset '{self.pcr_preset}'")

    def pcr(self) -> PcrConfig:
        """The typed PCR settings; a UsageError when --bits is missing or malformed."""
        if not self.pcr_bits:
            raise UsageError("--strategy pcr quantizes while collecting: give --bits (e.g. w4a8)")
        return PcrConfig(bits=self.pcr_bits, stages=self.pcr_stages, method=self.pcr_method,
                         preset=parse_choice(Preset, self.pcr_preset, "pcr preset"), recon=dict(self.pcr_recon or {}))

    @property
    def uniform_budget(self) -> int:
        return self.n_per_step * len(range(0, self.steps, self.every_k))

    def to_dict(self) -> dict[str, Any]:
        return self._drop_unused_pcr(asdict(self))

    def _drop_unused_pcr(self, d: dict[str, Any]) -> dict[str, Any]:
        """pcr_* fields only matter for strategy pcr (keeps other strategies' resume keys unchanged); pcr_bits is
        written as its 'wKaA' name, the form resume keys and manifests have always held."""
        if self.strategy != StrategyName.PCR:
            return {k: v for k, v in d.items() if not k.startswith("pcr_")}
        return {**d, "pcr_bits": None if self.pcr_bits is None else self.pcr_bits.name}

    def cqc_dict(self) -> dict[str, Any]:
        """The fields that determine C_QC (what a resumed build compares)."""
        return self._drop_unused_pcr({k: v for k, v in asdict(self).items()
                                      if not k.startswith("dc_") and k != "with_dc"})

    def cdc_dict(self) -> dict[str, Any]:
        """The fields that determine C_DC."""
        keep = ("steps", "seed", "cond_tokens", "batch_size", "shard_size")
        return {k: v for k, v in asdict(self).items() if k.startswith("dc_") or k in keep}
