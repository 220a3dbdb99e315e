"""The files of a CAD run directory and the digests that key them (resume ids, image caches)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_json

CHECKPOINT = "cad_checkpoint.pt"
LOG = "cad_log.json"
TRAIN_IMAGES = "cad_train_images.safetensors"
FP_GIVEN = "fp model (given)"  # training-image source (and cache key part) of an FP module passed in


def save_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, sort_keys=False)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tensor_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()[:16]
