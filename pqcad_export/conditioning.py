"""Conditioning of a `UNet2DConditionModel` (cross-attention embeddings) for every stage of a run.

A user brings text-encoder outputs as a safetensors file (`--cond FILE`: one tensor [N, L, D] or [L, D], D =
the UNet's cross_attention_dim); without one, a clearly labelled default is used: seeded N(0,1) token embeddings
[16, 8, D] (the UNet ships without its text encoder). Sample i of any sampling run, and training image i of CAD,
use row i mod N, so the FP teacher, the quantized model, the student and every engine see the same conditioning.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import UsageError

DEFAULT_ROWS = 16
DEFAULT_TOKENS = 8
DEFAULT_SEED = 20_240_917
COND_KEYS = ("encoder_hidden_states", "embeddings", "prompt_embeds")


@dataclass
class Conditioning:
    embeddings: torch.Tensor       # [N, L, D] float32 (CPU)
    source: str                    # "file" | "default"
    fingerprint: str
    path: Optional[str] = None

    @property
    def tokens(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def label(self) -> str:
        n, L, d = self.embeddings.shape
        if self.source == "file":
            return f"--cond {self.path} ({n} x {L} x {d} embeddings)"
        return (f"default: {n} seeded N(0,1) embeddings of {L} tokens x {d} (no --cond file given; not a text "
                f"prompt)")

    def rows(self, n: int, start: int = 0) -> torch.Tensor:
        """Rows start .. start+n-1 (mod N): [n, L, D]."""
        idx = (torch.arange(n) + int(start)) % self.embeddings.shape[0]
        return self.embeddings.index_select(0, idx)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The rows of the given image indices (mod N)."""
        return self.embeddings.index_select(0, idx.cpu().long() % self.embeddings.shape[0])

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "fingerprint": self.fingerprint,
                "shape": list(self.embeddings.shape), "label": self.label}


def cross_attention_dim(unet: torch.nn.Module) -> int:
    dim = unet.config.cross_attention_dim
    return int(dim[0] if isinstance(dim, (list, tuple)) else dim)


def _digest(x: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def default_conditioning(dim: int) -> Conditioning:
    g = torch.Generator().manual_seed(DEFAULT_SEED)
    emb = torch.randn((DEFAULT_ROWS, DEFAULT_TOKENS, int(dim)), generator=g)
    return Conditioning(emb, "default", _digest(emb))


def load_conditioning(path: str | Path, dim: int) -> Conditioning:
    """Read and check a --cond file (one-line UsageError for every problem)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--cond {p}: no such file")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(p))
    except Exception as exc:  # safetensors raises several types for a non-safetensors file
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--cond {p} is not a readable safetensors file ({msg[:120]})") from None
    key = next((k for k in COND_KEYS if k in tensors), None)
    if key is None:
        if len(tensors) != 1:
            raise UsageError(f"--cond {p} holds {len(tensors)} tensors; name the embeddings one of "
                             f"{', '.join(COND_KEYS)}")
        key = next(iter(tensors))
    emb = tensors[key]
    if emb.dim() == 2:
        emb = emb.unsqueeze(0)
    if emb.dim() != 3 or emb.shape[0] < 1 or emb.shape[1] < 1:
        raise UsageError(f"--cond {p}: '{key}' has shape {tuple(tensors[key].shape)}, expected [N, tokens, {dim}] "
                         f"or [tokens, {dim}]")
    if int(emb.shape[2]) != int(dim):
        raise UsageError(f"--cond {p}: embeddings are {int(emb.shape[2])}-dimensional, the UNet's "
                         f"cross_attention_dim is {dim}")
    if not emb.is_floating_point() or not torch.isfinite(emb.float()).all():
        raise UsageError(f"--cond {p}: '{key}' must hold finite floating-point values")
    emb = emb.float().contiguous()
    return Conditioning(emb, "file", _digest(emb), str(p.resolve()))


def resolve_conditioning(model, cond_path: Optional[str | Path]) -> Optional[Conditioning]:
    """The run's conditioning: None for an unconditional UNet (a --cond file for one is refused)."""
    if not model.is_conditional:
        if cond_path:
            raise UsageError(f"--cond given but {model.path} is an unconditional UNet ({model.class_name})")
        return None
    dim = cross_attention_dim(model.unet)
    return load_conditioning(cond_path, dim) if cond_path else default_conditioning(dim)


def from_record(model, record: Optional[dict[str, Any]]) -> Optional[Conditioning]:
    """The conditioning a run recorded (run.json `conditioning`), re-read and checked against its fingerprint."""
    if not model.is_conditional:
        return None
    record = record or {}
    cond = resolve_conditioning(model, record.get("path") if record.get("source") == "file" else None)
    want = record.get("fingerprint")
    if want and cond.fingerprint != want:
        raise UsageError(f"conditioning {cond.label} changed since the run was built (fingerprint "
                         f"{cond.fingerprint}, run has {want}); rebuild the run")
    return cond
