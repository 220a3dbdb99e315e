"""PCR's activation relaxing (Tang et al., arXiv 2311.06322, Sec. 3.3) at deployment time: a UNetFn that runs a
fraction of the sampling steps on a second, higher-activation-precision engine and the rest on the INT8 one.

PCR finds a few steps disproportionately sensitive to activation quantization: those nearest x_0 decide fidelity,
those nearest x_T structure. `relaxed_timesteps(grid, frac, where)` picks round(frac * steps) (at least 1) steps
at that end of the sampler's grid; `RelaxedUNet` dispatches each row of a batch by its timestep and counts calls,
rows and timesteps per engine, so a report can show what really ran where.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

RELAX_WHERE = ("x0", "xT")
RELAX_FRAC_RANGE = (0.05, 0.2)   # PCR relaxes a small share of the steps; 0.1 by default
RELAX_FRAC_DEFAULT = 0.1


def relaxed_timesteps(grid: Iterable[int], frac: float, where: str) -> list[int]:
    """The round(frac * len(grid)) (>= 1) timesteps of the sampler grid nearest x_0 (smallest t) or x_T."""
    lo, hi = RELAX_FRAC_RANGE
    if not lo <= float(frac) <= hi:
        raise ValueError(f"--relax-frac must be in [{lo}, {hi}], got {frac}")
    if where not in RELAX_WHERE:
        raise ValueError(f"--relax-where must be x0 or xT, got {where!r}")
    ts = sorted({int(t) for t in grid})
    if not ts:
        raise ValueError("empty timestep grid")
    n = max(1, int(round(float(frac) * len(ts))))
    return ts[:n] if where == "x0" else ts[-n:]


def average_act_bits(n_steps: int, n_relaxed: int, main_bits: int, relaxed_bits: int) -> float:
    """Step-averaged activation bits of a relaxed schedule (each step is one UNet call)."""
    if not 0 <= n_relaxed <= n_steps or n_steps < 1:
        raise ValueError(f"bad schedule: {n_relaxed} relaxed of {n_steps} steps")
    return (main_bits * (n_steps - n_relaxed) + relaxed_bits * n_relaxed) / n_steps


class RelaxedUNet:
    """eps = fn(x, t, cond): rows whose timestep is in `relax` go to `relaxed`, the others to `main`.

    `stats` (a plain dict, JSON-able, updated in place) has per engine: calls, rows and {timestep: rows}."""

    def __init__(self, main, relaxed, relax: Iterable[int], main_act_bits: int = 8, relaxed_act_bits: int = 32,
                 names: tuple[str, str] = ("int8", "relaxed")):
        self.main, self.relaxed = main, relaxed
        self.relax = sorted({int(t) for t in relax})
        self.main_act_bits, self.relaxed_act_bits = int(main_act_bits), int(relaxed_act_bits)
        self.names = names
        self.stats: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self.stats.clear()
        self.stats.update({n: {"calls": 0, "rows": 0, "timesteps": {}} for n in self.names})

    @property
    def device(self) -> torch.device:
        return getattr(self.main, "device", torch.device("cpu"))

    def _run(self, which: int, x, t, c):
        fn = (self.main, self.relaxed)[which]
        st = self.stats[self.names[which]]
        st["calls"] += 1
        st["rows"] += int(x.shape[0])
        for v in t.reshape(-1).tolist():
            st["timesteps"][str(int(v))] = st["timesteps"].get(str(int(v)), 0) + 1
        return fn(x, t, c)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        mask = torch.isin(t.long().cpu(), torch.tensor(self.relax, dtype=torch.long))
        if bool(mask.all()):
            return self._run(1, x, t, c)
        if not bool(mask.any()):
            return self._run(0, x, t, c)
        m = mask.to(x.device)
        out = torch.empty_like(x)
        for which, sel in ((0, ~m), (1, m)):
            idx = sel.nonzero().flatten()
            cc = None if c is None else c.index_select(0, idx.to(c.device))
            out[idx] = self._run(which, x.index_select(0, idx), t.index_select(0, idx.to(t.device)), cc).to(out)
        return out

    def average_act_bits(self, n_steps: int) -> float:
        """Activation bits averaged over an n_steps sampling run with this schedule."""
        return average_act_bits(n_steps, len(self.relax), self.main_act_bits, self.relaxed_act_bits)
