"""The `wKaA` bit-width specification (weights K bits, activations A bits)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError

SUPPORTED = ("w8a8", "w4a8", "w4a16", "w8a16")


@dataclass(frozen=True)
class BitSpec:
    weight_bits: int
    act_bits: int

    @property
    def name(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"

    @property
    def quantize_activations(self) -> bool:
        # 16-bit activations are left in floating point (FP16 on the engine), as in W4A16 weight-only schemes.
        return self.act_bits < 16

    def __str__(self) -> str:
        return self.name


def parse_bits(text: str) -> BitSpec:
    """Parse 'w4a8' and friends; anything else is a clear UsageError."""
    t = (text or "").strip().lower()
    m = re.fullmatch(r"w(\d+)a(\d+)", t)
    if not m or t not in SUPPORTED:
        raise UsageError(f"unsupported --bits '{text}': expected one of {', '.join(SUPPORTED)}")
    return BitSpec(int(m.group(1)), int(m.group(2)))


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of `numel` integers packed at `bits` each (the deployable size of a k-bit weight tensor)."""
    return (int(numel) * int(bits) + 7) // 8
