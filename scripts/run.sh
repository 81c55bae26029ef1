#!/usr/bin/env bash
# Set up geomcompile (idempotent) and run one job:
#   bash scripts/run.sh demo   -> geomcompile demo (small BN ResNet on 8x8 digits, with and without a policy)
#   bash scripts/run.sh test   -> the test suite (pytest; exits non-zero on any failure or if no test ran)
# Setup: a virtual environment in .venv that can see an already installed torch
# (--system-site-packages), torch installed only if missing, then this project.
# torch is never resolved unpinned: on a machine without an NVIDIA GPU we ask for the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"; shift || true
PY="${PYTHON:-python3}"
TORCH_VERSION="${GEOMCOMPILE_TORCH_VERSION:-2.13.0}"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv 2>/dev/null || echo "note: no venv module; installing into $PY's environment"
fi
[ -x .venv/bin/python ] && PY=.venv/bin/python

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
  else
    # CPU build: from PyTorch's CPU index when it answers; otherwise from pip's configured
    # sources (on machines with a local CPU wheel this is the plain pinned install).
    "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
        --retries 0 --timeout 20 2>/dev/null || "$PY" -m pip install -q "torch==$TORCH_VERSION"
  fi
fi
if ! "$PY" -c "import geomcompile, pytest, sklearn, matplotlib" 2>/dev/null || [ pyproject.toml -nt .venv/.installed ]; then
  "$PY" -m pip install -q -e ".[test]"
  mkdir -p .venv && touch .venv/.installed
fi

case "$job" in
  demo) exec "$PY" -m geomcompile demo "$@" ;;
  test) exec "$PY" -m pytest -q tests "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test [args]" >&2; exit 2 ;;
esac
