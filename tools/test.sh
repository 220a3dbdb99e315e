#!/usr/bin/env bash
# Set up (idempotent) and run the CPU test suite: the command CI runs (.ci/run) and the README gives.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh dev
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
