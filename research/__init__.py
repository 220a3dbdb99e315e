"""Research code: the paper's tables and studies of the method, on the library's public API (see README.md).

Not part of the installed product; run from a repository checkout as `python -m research.<script>`.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def module_env(**extra: str) -> dict[str, str]:
    """The environment for a child `python -m research.X`: this checkout first on PYTHONPATH (research is not an
    installed package), plus `extra`."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)
