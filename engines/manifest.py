"""engine.json: what was built, by which backend/version, which precision each layer runs in, and the build log.

Written atomically so a run directory never holds a half-written manifest (resumable builds trust it).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from pqcad_export.atomic import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)

MANIFEST_NAME = "engine.json"
SCHEMA_VERSION = 1


@dataclass
class EngineInfo:
    """The manifest of one built engine (engine.json)."""

    backend: str                      # "tensorrt" | "tensorrt-rtx" | "onnxruntime"
    engine_file: str                  # file name inside the engine directory (plan or onnx)
    source_onnx: str                  # the QDQ ONNX it was built from
    version: str                      # backend library version
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    sample_shape: Optional[list[int]] = None   # [C, H, W] of the UNet sample input
    timestep_dtype: str = "float32"
    batch_profile: Optional[list[int]] = None  # [min, opt, max] batch where the backend has a profile
    device: str = "cpu"
    executed: bool = False            # True only if the engine ran here (docs/architecture.md, "Honesty rules")
    validated: bool = False           # True if a real TensorRT-family parser/builder accepted the graph
    precision: dict[str, Any] = field(default_factory=dict)  # summary: counts of int8/int4/float layers, kernels
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer precision where known
    build_log: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: Optional[str] = None   # the FP model the ONNX was made from (compare refuses another model)
    created: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION
    directory: Optional[str] = None   # filled on load; not part of the written file

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("directory", None)
        return d

    @property
    def path(self) -> Path:
        if self.directory is None:
            raise ValueError("EngineInfo not bound to a directory")
        return Path(self.directory) / self.engine_file


def source_model_fingerprint(onnx_path: str | Path) -> Optional[str]:
    """The source model's fingerprint recorded in the exported ONNX's metadata (None when absent/unreadable)."""
    try:
        import onnx

        m = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        return None
    props = {p.key: p.value for p in m.metadata_props}
    return props.get("pqcad.meta.source_fingerprint") or None


def write_manifest(info: EngineInfo, out_dir: str | Path) -> Path:
    if info.model_fingerprint is None and info.source_onnx:
        info.model_fingerprint = source_model_fingerprint(info.source_onnx)
    out = Path(out_dir) / MANIFEST_NAME
    atomic_write_text(out, json.dumps(info.to_dict(), indent=2, sort_keys=False, default=str))
    info.directory = str(Path(out_dir))
    return out


def read_manifest(engine_dir: str | Path) -> EngineInfo:
    """Read DIR/engine.json; raises ValueError (callers turn it into a one-line error)."""
    p = Path(engine_dir) / MANIFEST_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {engine_dir}")
    d = json.loads(p.read_text())
    known = set(EngineInfo.__dataclass_fields__)
    info = EngineInfo(**{k: v for k, v in d.items() if k in known})
    info.directory = str(Path(engine_dir))
    return info


def engine_bytes(engine_dir: str | Path) -> int:
    """Size of a built engine on disk: every file of its directory but the manifest (the one definition the
    compare reports' `model_bytes` use)."""
    return sum(f.stat().st_size for f in Path(engine_dir).iterdir() if f.is_file() and f.name != MANIFEST_NAME)
