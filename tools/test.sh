#!/usr/bin/env bash
# Set up (idempotent) and run the CPU test suite: the command CI runs (.ci/run) and the README gives.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh dev
if [ $# -gt 0 ]; then exec .venv/bin/python -m pytest -q -m "not slow" "$@"; fi
# One pytest-xdist worker per core (at most 4; every test is single-threaded, tests/conftest.py), each
# test module on one worker (--dist loadfile) so its module-scoped fixtures are built once. PQCAD_TEST_WORKERS=1:
# one process.
W="${PQCAD_TEST_WORKERS:-$(nproc)}"; [ "$W" -gt 4 ] && W=4
XDIST=(); [ "$W" -gt 1 ] && XDIST=(-n "$W" --dist loadfile)
# one OpenMP thread per worker process: N workers on N cores, not N x N threads
[ "$W" -gt 1 ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -m "not slow" ${XDIST[@]+"${XDIST[@]}"}
