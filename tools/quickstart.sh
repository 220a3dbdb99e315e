#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the built-in teacher: pqcad-export build --bits w4a8.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/pqcad-export build --bits w4a8 "$@"
