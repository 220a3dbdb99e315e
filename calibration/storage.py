"""On-disk format of calibration sets (C_QC, C_DC): safetensors shards + `manifest.json`.

Layout of one set directory::

    <set>/manifest.json             written last; its presence means "complete"
    <set>/shard-00000.safetensors   rows of every field, first dimension = rows in the shard
    <set>/shard-00001.safetensors   ...

A calibration directory (`--out` of `pqcad-export calibrate`, `runs/<name>/calib/`) holds one set per kind:
`<calib>/c_qc/` and `<calib>/c_dc/`. `open_set(<calib>, "c_qc")` and `open_set(<calib>/c_qc)` both work.

Shards are written to a temporary name and renamed; the old manifest is removed before any new shard is written
and the new manifest is written (atomically) after every shard, so a crash never leaves a manifest that points at
missing or partial data. Each shard's sha256 is in the manifest, so silent corruption is caught on load.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pqcad_export.atomic import atomic_write_bytes, atomic_write_json
from pqcad_export.errors import PqcadError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("c_qc", "c_dc")
SHARD_PATTERN = "shard-{:05d}.safetensors"

# Fields every set carries, and what they mean (copied into the manifest so a reader needs no code).
BASE_FIELDS: dict[str, str] = {
    "sample": "z_t: the UNet input at this step (float32 [C,H,W])",
    "timestep": "the diffusion timestep t fed to the UNet (int64, scheduler units 0..num_train_timesteps-1)",
    "step_index": "index of t in the teacher's DDIM grid (int64, 0 = first step, pure noise)",
    "trajectory": "which seeded FP trajectory the row was taken from (int64)",
}
COND_FIELD = ("encoder_hidden_states", "cross-attention conditioning fed with z_t (float32 [L,D])")


def _fsync_write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    atomic_write_json(path, obj, sort_keys=False)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


class ShardWriter:
    """Streams rows (dicts of tensors with the same first dimension) into fixed-size shards.

    Holds at most one shard's worth of rows in memory. `close(meta)` writes the manifest and returns it.
    """

    def __init__(self, set_dir: str | Path, kind: str, shard_size: int = 1024,
                 descriptions: Optional[dict[str, str]] = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if shard_size < 1:
            raise PqcadError(f"shard size must be >= 1, got {shard_size}")
        self.dir = Path(set_dir)
        self.kind = kind
        self.shard_size = int(shard_size)
        self.descriptions = dict(BASE_FIELDS)
        self.descriptions[COND_FIELD[0]] = COND_FIELD[1]
        self.descriptions.update(descriptions or {})
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._fields: Optional[dict[str, dict[str, Any]]] = None
        self._step_counts: dict[int, int] = {}
        self._closed = False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PqcadError(f"cannot create calibration directory {self.dir}: {exc.strerror or exc}") from None
        # Invalidate any previous set here before writing new shards (its shards are removed on close).
        old = self.dir / MANIFEST
        if old.exists():
            old.unlink()

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self._shards) + self._pending_rows

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        rows = {k: v.detach().to("cpu").contiguous() for k, v in rows.items()}
        n = {v.shape[0] for v in rows.values()}
        if len(n) != 1:
            raise ValueError(f"rows have different first dimensions: { {k: v.shape for k, v in rows.items()} }")
        fields = {k: {"dtype": _dtype_name(v), "shape": list(v.shape[1:])} for k, v in rows.items()}
        if self._fields is None:
            self._fields = fields
        elif fields != self._fields:
            raise ValueError(f"row fields changed: {fields} vs {self._fields}")
        n_rows = n.pop()
        if n_rows == 0:
            return
        for s in rows["step_index"].tolist():
            self._step_counts[int(s)] = self._step_counts.get(int(s), 0) + 1
        self._pending.append(rows)
        self._pending_rows += n_rows
        while self._pending_rows >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        merged = {k: torch.cat([r[k] for r in self._pending]) for k in self._pending[0]}
        head = {k: v[:n].contiguous() for k, v in merged.items()}
        tail = {k: v[n:] for k, v in merged.items()}
        self._pending = [tail] if tail["step_index"].shape[0] else []
        self._pending_rows -= n
        name = SHARD_PATTERN.format(len(self._shards))
        data = st_save(head, metadata={"kind": self.kind, "format_version": str(FORMAT_VERSION)})
        _fsync_write(self.dir / name, data)
        self._shards.append({"file": name, "count": n, "sha256": hashlib.sha256(data).hexdigest(),
                             "steps": sorted({int(s) for s in head["step_index"].tolist()})})

    def close(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Flush the last shard, write the manifest (last, atomically), drop stale shards; return the manifest."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._closed = True
        if not self._shards:
            raise PqcadError(f"no calibration rows were collected for {self.kind}")
        fields = {k: dict(v, description=self.descriptions.get(k, "")) for k, v in (self._fields or {}).items()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            **meta,
            "count": self.count,
            "per_step_counts": {str(k): v for k, v in sorted(self._step_counts.items())},
            "fields": fields,
            "shards": self._shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(self.dir / MANIFEST, manifest)
        keep = {s["file"] for s in self._shards}
        for f in self.dir.glob("shard-*.safetensors"):
            if f.name not in keep:
                f.unlink()
        return manifest


def write_set(set_dir: str | Path, kind: str, rows: dict[str, torch.Tensor], meta: dict[str, Any],
              shard_size: int = 1024, descriptions: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Write an in-memory set in one call (tests, small sets)."""
    w = ShardWriter(set_dir, kind, shard_size, descriptions)
    w.add(rows)
    return w.close(meta)


def resolve_set_dir(path: str | Path, kind: Optional[str] = None) -> Path:
    """`path` may be the set directory itself or a calibration directory holding `<kind>/manifest.json`."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    if kind is not None and (p / kind / MANIFEST).is_file():
        return p / kind
    if not p.exists():
        raise PqcadError(f"calibration directory does not exist: {p}")
    where = f"{p / MANIFEST}" + (f" or {p / kind / MANIFEST}" if kind else "")
    raise PqcadError(f"no calibration manifest at {where} (run `pqcad-export calibrate` first)")


def read_manifest(set_dir: str | Path) -> dict[str, Any]:
    f = Path(set_dir) / MANIFEST
    try:
        m = json.loads(f.read_text())
    except FileNotFoundError:
        raise PqcadError(f"missing calibration manifest {f}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PqcadError(f"corrupt calibration manifest {f}: {exc}") from None
    required = ("format_version", "kind", "count", "fields", "shards", "fingerprint")
    if not isinstance(m, dict) or any(k not in m for k in required):
        missing = [k for k in required if not isinstance(m, dict) or k not in m]
        raise PqcadError(f"corrupt calibration manifest {f}: missing {', '.join(missing)}")
    if m["format_version"] != FORMAT_VERSION:
        raise PqcadError(f"calibration manifest {f} has format version {m['format_version']}, "
                         f"this tool reads version {FORMAT_VERSION}; recollect with `pqcad-export calibrate`")
    if m["kind"] not in KINDS:
        raise PqcadError(f"corrupt calibration manifest {f}: unknown kind {m['kind']!r}")
    if not isinstance(m["shards"], list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                                    and "/" not in s["file"] and "\\" not in s["file"]
                                                    and isinstance(s.get("count"), int) for s in m["shards"]):
        raise PqcadError(f"corrupt calibration manifest {f}: bad shard list")
    if not isinstance(m["fields"], dict) or not all(isinstance(v, dict) and "dtype" in v and "shape" in v
                                                   for v in m["fields"].values()):
        raise PqcadError(f"corrupt calibration manifest {f}: bad field list")
    if sum(s["count"] for s in m["shards"]) != m["count"]:
        raise PqcadError(f"corrupt calibration manifest {f}: shard counts do not add up to {m['count']}")
    return m


class CalibSet:
    """A calibration set on disk, read shard by shard.

    Rows are dicts {"sample": [B,C,H,W] f32, "timestep": [B] i64, "step_index": [B] i64, "trajectory": [B] i64,
    optional "encoder_hidden_states": [B,L,D] f32, and for C_DC "x0_pred", "model_output", ...}.
    """

    def __init__(self, path: str | Path, kind: Optional[str] = None, expect_fingerprint: Optional[str] = None,
                 verify: bool = True):
        self.dir = resolve_set_dir(path, kind)
        self.manifest = read_manifest(self.dir)
        self.verify = verify
        if kind is not None and self.manifest["kind"] != kind:
            raise PqcadError(f"{self.dir} holds a {self.manifest['kind']} set, expected {kind}")
        if expect_fingerprint is not None and self.manifest["fingerprint"] != expect_fingerprint:
            raise PqcadError(f"calibration set {self.dir} was collected from model {self.manifest['fingerprint']}, "
                             f"not from this model ({expect_fingerprint}); recollect with `pqcad-export calibrate`")
        for s in self.manifest["shards"]:
            if not (self.dir / s["file"]).is_file():
                raise PqcadError(f"calibration shard missing: {self.dir / s['file']}")

    # -- metadata -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def fields(self) -> list[str]:
        return list(self.manifest["fields"])

    @property
    def per_step_counts(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.manifest.get("per_step_counts", {}).items()}

    # -- reading --------------------------------------------------------------------------------------------
    def load_shard(self, i: int) -> dict[str, torch.Tensor]:
        """One shard as tensors (checked against the manifest's sha256, fields and count)."""
        s = self.manifest["shards"][i]
        f = self.dir / s["file"]
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise PqcadError(f"cannot read calibration shard {f}: {exc.strerror or exc}") from None
        if self.verify and s.get("sha256") and hashlib.sha256(data).hexdigest() != s["sha256"]:
            raise PqcadError(f"corrupt calibration shard {f}: checksum mismatch")
        try:
            rows = st_load(data)
        except Exception as exc:  # safetensors raises SafetensorError / ValueError for damaged files
            raise PqcadError(f"corrupt calibration shard {f}: {str(exc).splitlines()[0] if str(exc) else exc}") \
                from None
        for name, spec in self.manifest["fields"].items():
            t = rows.get(name)
            if t is None or list(t.shape) != [s["count"], *spec["shape"]] or _dtype_name(t) != spec["dtype"]:
                got = None if t is None else (list(t.shape), _dtype_name(t))
                raise PqcadError(f"corrupt calibration shard {f}: field {name!r} is {got}, manifest says "
                                 f"{[s['count'], *spec['shape']]} {spec['dtype']}")
        return rows

    def _shard_indices(self, steps: Optional[set[int]]) -> list[int]:
        shards = self.manifest["shards"]
        if steps is None:
            return list(range(len(shards)))
        return [i for i, s in enumerate(shards) if "steps" not in s or steps.intersection(s["steps"])]

    def iter_batches(self, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
                     steps: Optional[Iterable[int]] = None, drop_last: bool = False,
                     keys: Optional[Sequence[str]] = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches, loading one shard at a time (memory: one shard + one batch).

        shuffle: shard order and rows within each shard are permuted with `seed` (a block shuffle: rows of one
        batch come from at most two neighbouring shards, enough for calibration and bounded in memory).
        steps: keep only rows whose step_index is in this set (shards without such steps are never read).
        """
        if batch_size < 1:
            raise PqcadError(f"batch size must be >= 1, got {batch_size}")
        want = None if steps is None else {int(s) for s in steps}
        rng = np.random.default_rng(seed)
        order = self._shard_indices(want)
        if shuffle:
            order = [order[i] for i in rng.permutation(len(order))]
        carry: Optional[dict[str, torch.Tensor]] = None
        for i in order:
            rows = self.load_shard(i)
            if want is not None:
                mask = torch.isin(rows["step_index"], torch.tensor(sorted(want), dtype=torch.int64))
                rows = {k: v[mask] for k, v in rows.items()}
            if keys is not None:
                missing = [k for k in keys if k not in rows]
                if missing:
                    raise PqcadError(f"calibration set {self.dir} has no field(s) {', '.join(missing)}")
                rows = {k: rows[k] for k in keys}
            if shuffle:
                n = next(iter(rows.values())).shape[0]
                perm = torch.from_numpy(rng.permutation(n))
                rows = {k: v[perm] for k, v in rows.items()}
            if carry is not None:
                rows = {k: torch.cat([carry[k], rows[k]]) for k in rows}
                carry = None
            n = next(iter(rows.values())).shape[0]
            full = (n // batch_size) * batch_size
            for b in range(0, full, batch_size):
                yield {k: v[b:b + batch_size] for k, v in rows.items()}
            if full < n:
                carry = {k: v[full:].clone() for k, v in rows.items()}
        if carry is not None and not drop_last:
            yield carry

    def load_all(self, steps: Optional[Iterable[int]] = None) -> dict[str, torch.Tensor]:
        """Every row (optionally only some steps) in one dict of tensors, in stored order (small sets only)."""
        want = None if steps is None else {int(s) for s in steps}
        parts: list[dict[str, torch.Tensor]] = []
        for i in self._shard_indices(want):
            rows = self.load_shard(i)
            if want is not None:
                mask = torch.isin(rows["step_index"], torch.tensor(sorted(want), dtype=torch.int64))
                rows = {k: v[mask] for k, v in rows.items()}
            parts.append(rows)
        if not parts:
            return {k: torch.empty((0, *spec["shape"]), dtype=getattr(torch, spec["dtype"]))
                    for k, spec in self.manifest["fields"].items()}
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def open_set(path: str | Path, kind: Optional[str] = None, expect_fingerprint: Optional[str] = None,
             verify: bool = True) -> CalibSet:
    """Open a calibration set (see CalibSet); `path` is the set dir or the calibration dir with `<kind>/`."""
    return CalibSet(path, kind, expect_fingerprint, verify)


def is_complete(path: str | Path, kind: str, fingerprint: str, config: Optional[dict[str, Any]] = None) -> bool:
    """True when a finished set of `kind` for this model (and, if given, this config) is already there.

    The build pipeline uses it to skip recollection on resume. Never raises for a missing/corrupt set.
    """
    try:
        s = CalibSet(path, kind, expect_fingerprint=fingerprint, verify=False)
    except PqcadError:
        return False
    return config is None or s.manifest.get("config") == config
