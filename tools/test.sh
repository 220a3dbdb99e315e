#!/usr/bin/env bash
# Set up (idempotent) and run the CPU test suite: the command CI runs (.ci/run) and the README gives.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh dev
if [ $# -gt 0 ]; then exec .venv/bin/python -m pytest -q -m "not slow" "$@"; fi
# The in-process SIGTERM test runs in its own pytest process: delivered to a process where OpenVINO has
# compiled static-batch engines, SIGTERM ends in a segfault (docs/architecture.md, "Known issues").
.venv/bin/python -m pytest -q -m "not slow" tests/test_robust_cad.py
exec .venv/bin/python -m pytest -q -m "not slow" --ignore tests/test_robust_cad.py
