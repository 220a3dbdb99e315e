"""C_DC for CAD: the calibration rows grouped by student timestep (from a calibration dir, a rows dict or
batches)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch

from ..errors import PqcadError


@dataclass
class CdcBank:
    """C_DC rows grouped by timestep: {t: {"sample", "x0_pred", "model_output"[, "encoder_hidden_states"]}}."""

    by_t: dict[int, dict[str, torch.Tensor]]
    fingerprint: Optional[str] = None
    ignored_rows: int = 0

    def rows(self, t: int) -> Optional[dict[str, torch.Tensor]]:
        return self.by_t.get(int(t))

    @property
    def count(self) -> int:
        return sum(int(v["sample"].shape[0]) for v in self.by_t.values())


CdcSource = Union[str, Path, "CdcBank", Mapping[str, torch.Tensor], Iterable[Mapping[str, torch.Tensor]], None]


def load_cdc(source: CdcSource, student_timesteps: Optional[torch.Tensor] = None,
             expect_fingerprint: Optional[str] = None) -> CdcBank:
    """C_DC from a calibration dir / set dir (calibration.storage), a dict of row tensors, or an iterable of dict
    batches; rows whose timestep is not on the student grid are dropped (counted)."""
    if isinstance(source, CdcBank):
        return source
    fp = None
    if source is None:
        return CdcBank({})
    if isinstance(source, (str, Path)):
        from calibration.storage import open_set

        s = open_set(source, "c_dc", expect_fingerprint=expect_fingerprint)
        rows, fp = s.load_all(), s.fingerprint
    elif isinstance(source, Mapping):
        rows = dict(source)
    else:
        parts = [dict(b) for b in source]
        if not parts:
            raise PqcadError("C_DC is empty")
        rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    for k in ("sample", "timestep"):
        if k not in rows:
            raise PqcadError(f"C_DC rows have no '{k}' field")
    keep = ("sample", "x0_pred", "model_output", "encoder_hidden_states")
    t_all = rows["timestep"].long().reshape(-1)
    grid = None if student_timesteps is None else {int(t) for t in student_timesteps}
    by_t: dict[int, dict[str, torch.Tensor]] = {}
    ignored = 0
    for t in sorted(set(t_all.tolist())):
        if grid is not None and t not in grid:
            ignored += int((t_all == t).sum())
            continue
        m = t_all == t
        by_t[t] = {k: rows[k][m].float() for k in keep if k in rows}
    if rows["sample"].shape[0] and not by_t:
        raise PqcadError("no C_DC row lies on the student's timestep grid (collected with another schedule?)")
    return CdcBank(by_t, fp, ignored)
