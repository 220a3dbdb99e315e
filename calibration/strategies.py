"""Which trajectory samples become calibration inputs, per DDIM step.

A strategy answers two questions:
  * `counts(T)`: how many inputs n_t to keep at each step t (an int array of length T);
  * `select(step, n, candidates, features, rng)`: which of the candidate trajectories to keep at that step.

Data-independent strategies (uniform, NDTC) select uniformly at random, so the collector can decide up front and
stream. Data-dependent ones (TDAC) set `needs_features` and receive per-candidate features from a forward hook
on `feature_module(unet)`. A strategy that must collect its own way (PCR's progressive collection, pcr.py)
overrides `collect`. New strategies register with `@register_strategy`; `StrategyName` lists the built-in ones and
`strategy_choices()` every registered one (for click choices).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import numpy as np
import torch
from scipy.stats import norm

if TYPE_CHECKING:  # annotations only: config.py imports this module, not the other way round
    from pqcad_export.model_io import LoadedModel

    from .config import CalibConfig


class StrategyName(str, Enum):
    """The built-in C_QC selection strategies (registered below and in pcr.py)."""

    UNIFORM = "uniform"   # Q-Diffusion / TFMQ-DM
    NDTC = "ndtc"         # PTQ4DM
    TDAC = "tdac"         # EDA-DM
    PCR = "pcr"           # PCR progressive calibration


STRATEGIES: dict[str, type["Strategy"]] = {}


def register_strategy(cls: type["Strategy"]) -> type["Strategy"]:
    STRATEGIES[cls.name] = cls
    return cls


def strategy_choices() -> list[str]:
    """Every registered strategy name (the built-ins of `StrategyName` plus any registered later)."""
    return list(STRATEGIES)


def get_strategy(cfg: "CalibConfig") -> "Strategy":
    from pqcad_export.errors import UsageError

    if cfg.strategy not in STRATEGIES:
        raise UsageError(f"unknown --strategy '{cfg.strategy}': expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](cfg)


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `weights` that sum exactly to `total` (Hamilton's method)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    raw = w * total
    out = np.floor(raw).astype(np.int64)
    short = int(total - out.sum())
    if short > 0:
        # ties broken towards earlier steps, deterministically
        order = np.lexsort((np.arange(len(w)), -(raw - out)))
        out[order[:short]] += 1
    return out


class Strategy(ABC):
    name: ClassVar[str]
    needs_features: ClassVar[bool] = False

    def __init__(self, cfg: "CalibConfig"):
        self.cfg = cfg

    @abstractmethod
    def counts(self, steps: int) -> np.ndarray:
        """n_t for t = 0..steps-1 (step 0 = first DDIM step, pure noise)."""

    def n_trajectories(self, steps: int) -> int:
        """How many FP trajectories to run: enough that every step can draw n_t distinct trajectories, and at
        least n_per_step so that strategies with few samples per step (NDTC) still see as many starting noises
        as `uniform` does at the same cost."""
        if self.cfg.n_trajectories is not None:
            return int(self.cfg.n_trajectories)
        return max(1, int(self.counts(steps).max()), int(self.cfg.n_per_step))

    def select(self, step: int, n: int, candidates: np.ndarray, features: Optional[dict[str, torch.Tensor]],
               rng: np.random.Generator) -> np.ndarray:
        """Indices into `candidates` (trajectory ids) to keep; default: n distinct ones uniformly at random."""
        if n > len(candidates):
            from pqcad_export.errors import UsageError

            raise UsageError(f"step {step} needs {n} samples but only {len(candidates)} trajectories were run; "
                             f"raise the trajectory count or lower the per-step budget")
        return np.sort(rng.choice(len(candidates), size=n, replace=False))

    def keep_mask(self, counts: np.ndarray, n_traj: int, rng: np.random.Generator) -> np.ndarray:
        """[T, n_traj] bool: which trajectory's z_t is kept at each step, decided up front (data-independent)."""
        keep = np.zeros((len(counts), n_traj), dtype=bool)
        for i in np.flatnonzero(counts):
            keep[i, self.select(int(i), int(counts[i]), np.arange(n_traj), None, rng)] = True
        return keep

    def feature_module(self, unet: torch.nn.Module) -> Optional[torch.nn.Module]:
        return None

    def collect(self, model: "LoadedModel", out_dir: str | Path, device: str | torch.device,
                cond: Optional[torch.Tensor], quiet: bool) -> Optional[dict[str, Any]]:
        """A strategy with its own collector writes the set and returns its manifest; None (the default) lets
        `collect_cqc` stream the FP trajectories."""
        return None

    def describe(self) -> dict:
        return {"name": self.name}


@register_strategy
class Uniform(Strategy):
    """n_fixed inputs at every k-th step (Q-Diffusion, TFMQ-DM): equal weight for all timesteps."""

    name = StrategyName.UNIFORM.value

    def counts(self, steps: int) -> np.ndarray:
        c = np.zeros(steps, dtype=np.int64)
        c[0:steps:self.cfg.every_k] = self.cfg.n_per_step
        return c

    def describe(self) -> dict:
        return {"name": self.name, "n_per_step": self.cfg.n_per_step, "every_k": self.cfg.every_k}


@register_strategy
class NDTC(Strategy):
    """PTQ4DM's normally distributed time-step calibration: n_t ∝ N(t; μ, σ²) over the step index.

    PTQ4DM draws t_i ~ N(μ, σ²) independently for a fixed total; we use the expected counts of those draws
    (probability mass of each step's unit interval, largest-remainder rounding), which keeps the total exact and
    the result reproducible. μ = ndtc_mean·T (mid-trajectory by default), σ = ndtc_std·T.
    """

    name = StrategyName.NDTC.value

    def total(self) -> int:
        return int(self.cfg.n_total) if self.cfg.n_total is not None else self.cfg.uniform_budget

    def counts(self, steps: int) -> np.ndarray:
        mu, sigma = self.cfg.ndtc_mean * (steps - 1), self.cfg.ndtc_std * steps
        edges = np.arange(steps + 1) - 0.5
        mass = np.diff(norm.cdf(edges, loc=mu, scale=sigma))
        mass = np.maximum(mass, 1e-12)
        return largest_remainder(mass, self.total())

    def describe(self) -> dict:
        return {"name": self.name, "total": self.total(), "mean": self.cfg.ndtc_mean, "std": self.cfg.ndtc_std}


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return torch.zeros_like(x) if span <= 0 else (x - x.min()) / span


def tdac_scores(pooled: torch.Tensor, spread: torch.Tensor, density_weight: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDA-DM TDAC scores of N candidates at one step -> (score, density, variety), each [N].

    density: Gaussian-kernel density of the sample's pooled mid-block feature among the step's candidates,
      (1/N) Σ_j exp(-‖f_i - f_j‖² / 2h²), bandwidth h = median pairwise distance: high for samples that
      represent where the step's activations concentrate.
    variety: spread (std) of the sample's own mid-block feature map: high for samples whose activations span a
      wide range, which the quantizer's range must cover.
    Both are min-max normalised per step; score = w·density + (1-w)·variety. EDA-DM (arXiv 2401.04585) selects
    by density and diversity of latent features; these are our concrete definitions of those two terms.
    """
    f = pooled.double().flatten(1)
    d2 = torch.cdist(f, f).pow(2)
    n = f.shape[0]
    off = d2[~torch.eye(n, dtype=torch.bool)] if n > 1 else d2.flatten()
    h2 = off.sqrt().median().pow(2).clamp_min(1e-12)
    density = torch.exp(-d2 / (2 * h2)).mean(1)
    density_n, variety_n = _minmax(density), _minmax(spread.double())
    score = density_weight * density_n + (1 - density_weight) * variety_n
    return score, density, spread.double()


@register_strategy
class TDAC(Strategy):
    """EDA-DM's temporal distribution alignment calibration: per step, keep the n_t highest-scoring candidates
    (density + variety of mid-block features, see `tdac_scores`). Per-step budget: `uniform`'s (every k-th
    step, n_per_step each); candidates per step = tdac_candidates x n_t trajectories."""

    name = StrategyName.TDAC.value
    needs_features = True

    def counts(self, steps: int) -> np.ndarray:
        return Uniform(self.cfg).counts(steps)

    def n_trajectories(self, steps: int) -> int:
        if self.cfg.n_trajectories is not None:
            return int(self.cfg.n_trajectories)
        return max(1, int(self.counts(steps).max()) * self.cfg.tdac_candidates)

    def feature_module(self, unet: torch.nn.Module) -> Optional[torch.nn.Module]:
        mid = getattr(unet, "mid_block", None)
        if mid is None:
            from pqcad_export.errors import PqcadError

            raise PqcadError(f"--strategy tdac needs a UNet with a mid block; {type(unet).__name__} has none")
        return mid

    @staticmethod
    def featurize(mid_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample summaries of the mid-block output [B,C,h,w] kept for scoring (small: C+1 floats)."""
        m = mid_out.detach().float()
        return {"pooled": m.mean(dim=(2, 3)).cpu(), "spread": m.flatten(1).std(dim=1).cpu()}

    def select(self, step, n, candidates, features, rng):
        if features is None:
            raise RuntimeError("tdac needs features")
        if n > len(candidates):
            return super().select(step, n, candidates, features, rng)
        score, _, _ = tdac_scores(features["pooled"], features["spread"], self.cfg.tdac_density_weight)
        top = torch.argsort(score, descending=True, stable=True)[:n]
        return np.sort(top.numpy())

    def describe(self) -> dict:
        return {"name": self.name, "n_per_step": self.cfg.n_per_step, "every_k": self.cfg.every_k,
                "density_weight": self.cfg.tdac_density_weight, "candidates_per_sample": self.cfg.tdac_candidates,
                "features": "mid_block output: global-average-pooled (density) and std (variety)"}
