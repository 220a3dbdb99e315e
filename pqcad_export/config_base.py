"""One preset / override / validate / serialise base for every stage config, and typed choice sets.

Why: each config class (calibration, reconstruction, distillation, compare, build) had its own copy of `preset`,
`with_overrides` and a nested `need` helper, and they had drifted (some ignored None overrides, some did not
reject unknown names). A config is a `@dataclass` that inherits `ConfigBase` and declares its presets as field
overrides of the defaults; `validate()` adds the class's own checks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields, replace
from enum import Enum
from typing import Any, ClassVar, TypeVar

from .errors import UsageError

E = TypeVar("E", bound=Enum)
C = TypeVar("C", bound="ConfigBase")


def choices(enum_cls: type[Enum]) -> list[str]:
    """The values of a str Enum, in declaration order: what `click.Choice` takes."""
    return [str(m.value) for m in enum_cls]


def parse_choice(enum_cls: type[E], value: Any, option: str) -> E:
    """`value` as a member of `enum_cls`, or a one-line UsageError naming the option and the choices."""
    try:
        return enum_cls(value)
    except ValueError:
        raise UsageError(f"unknown {option} '{value}': expected one of {', '.join(choices(enum_cls))}") from None


class Preset(str, Enum):
    """`quick` finishes on a 2-core CPU; `paper` uses the paper's hyper-parameters."""

    QUICK = "quick"
    PAPER = "paper"


def require(ok: bool, msg: str) -> None:
    """Raise UsageError(msg) unless ok: the one check every `validate()` is made of."""
    if not ok:
        raise UsageError(msg)


class ConfigBase:
    """Mixin for `@dataclass` configs.

    Subclasses set `PRESETS` (preset name -> field values that differ from the defaults; `paper` is usually
    `{}`) and `OPTIONS` (the word in "unknown <OPTIONS> option(s)"), and override `validate()`.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}}
    OPTIONS: ClassVar[str] = "configuration"

    @classmethod
    def preset(cls: type[C], name: str, **overrides: Any) -> C:
        """The preset's config with `overrides` applied (None values keep the preset's value) and validated."""
        if name not in cls.PRESETS:
            raise UsageError(f"unknown preset '{name}': expected {' or '.join(cls.PRESETS)}")
        return cls(**cls.PRESETS[name]).with_overrides(**overrides)

    def with_overrides(self: C, **overrides: Any) -> C:
        """Replace fields, ignoring None values (CLI options left unset keep the preset's value); unknown names
        are a UsageError; the result is validated."""
        names = {f.name for f in fields(self)}
        bad = [k for k in overrides if k not in names]
        if bad:
            raise UsageError(f"unknown {self.OPTIONS} option(s): {', '.join(bad)}")
        cfg = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise UsageError on an invalid combination (subclasses add their checks)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (what logs and manifests record)."""
        return asdict(self)

    def fingerprint(self) -> str:
        """A short, stable digest of `to_dict()`: equal configs, equal fingerprints (for resume keys)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:16]
