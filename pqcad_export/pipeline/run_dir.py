"""The run directory of one `build`: run.json (config, fingerprints, versions, stage status) and the rule that a
stage whose inputs did not change is not recomputed.

Each stage has a key = hash(stage config + keys of the stages it depends on + model fingerprint). A stage is done
when run.json records status "done" with the same key and its outputs exist; otherwise it runs again (and may resume
from its own checkpoints inside its folder, e.g. per block in PQ).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write_json  # noqa: F401  (re-exported for pipeline modules)
from ..errors import PqcadError

STAGES = ("calib", "quant", "student", "export", "engine", "report")


def stage_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("pqcad-export", "torch", "diffusers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
                 "tensorrt-rtx-cu13-bindings", "pot", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


@dataclass
class RunDir:
    root: Path
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path, model_fingerprint: str, config: dict[str, Any], resume: bool = True
             ) -> "RunDir":
        """Open (or create) a run directory; refuse one made by a different model."""
        root = Path(root)
        run_json = root / "run.json"
        state: dict[str, Any] = {}
        if run_json.is_file():
            try:
                state = json.loads(run_json.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise PqcadError(f"corrupt {run_json}: {exc}; move it away or use a new --out") from None
            old = state.get("model_fingerprint")
            if old and old != model_fingerprint:
                raise PqcadError(f"run directory {root} was made by a different model (fingerprint {old}, this "
                                 f"model {model_fingerprint}); use a new --out")
        if not resume:
            state["stages"] = {}
        state.update({"model_fingerprint": model_fingerprint, "config": config, "versions": package_versions(),
                      "format": 1})
        state.setdefault("stages", {})
        state.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
        rd = cls(root, state)
        rd.save()
        return rd

    def save(self) -> None:
        atomic_write_json(self.root / "run.json", self.state)

    def path(self, stage: str) -> Path:
        return self.root / stage

    def is_done(self, stage: str, key: str, outputs: tuple[str, ...] = ()) -> bool:
        st = self.state["stages"].get(stage, {})
        if st.get("status") != "done" or st.get("key") != key:
            return False
        return all((self.root / o).exists() for o in outputs)

    def start(self, stage: str, key: str) -> None:
        """`resumed` starts False: only the stage itself knows whether it reused checkpointed work (finish)."""
        prev = self.state["stages"].get(stage, {})
        retry = prev.get("key") == key and prev.get("status") in ("running", "failed")
        self.state["stages"][stage] = {"status": "running", "key": key, "started": time.time(),
                                       "resumed": False, "rerun_after_interruption": bool(retry)}
        self.save()

    def finish(self, stage: str, info: Optional[dict[str, Any]] = None,
               resume: Optional[dict[str, Any]] = None) -> None:
        """`resume`: the stage's own facts (resumed, reused_blocks / resumed_from_iter)."""
        st = self.state["stages"][stage]
        st.update({"status": "done", "seconds": round(time.time() - st["started"], 2), "info": info or {}})
        st.update(resume or {})
        self.save()

    def fail(self, stage: str, message: str) -> None:
        st = self.state["stages"].setdefault(stage, {})
        st.update({"status": "failed", "error": message})
        self.save()

    def skip(self, stage: str, reason: str) -> None:
        self.state["stages"][stage] = {"status": "skipped", "reason": reason}
        self.save()
