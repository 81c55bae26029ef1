#!/usr/bin/env bash
# Set up geomcompile (idempotent) and run one job:
#   bash scripts/run.sh demo   -> geomcompile demo (small BN ResNet on 8x8 digits, with and without a policy)
#   bash scripts/run.sh test   -> the test suite (pytest; exits non-zero on any failure or if no test ran),
#                                 after installing the framework clients it drives (tests/requirements.txt)
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

# True when every `name==version` line of the given files is installed at exactly that version
# (package metadata only: importing lightning and transformers would take seconds).
pins_installed() {
  "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for path in sys.argv[1:]:
    for line in open(path):
        name, sep, want = line.split("#")[0].strip().partition("==")
        if not sep:
            continue
        try:
            if version(name.strip()) != want.strip():
                sys.exit(1)
        except PackageNotFoundError:
            sys.exit(1)
EOF
}

# The test job's framework clients (Lightning, transformers, accelerate), pinned. pip gets a
# constraint holding torch at the installed version, so it can never replace or upgrade it.
install_test_deps() {
  if pins_installed tests/requirements.txt tests/constraints.txt tests/requirements-nodeps.txt; then
    return
  fi
  local torch_pin
  torch_pin="$(mktemp)"
  "$PY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > "$torch_pin"
  "$PY" -m pip install -q -r tests/requirements.txt -c tests/constraints.txt -c "$torch_pin"
  "$PY" -m pip install -q --no-deps -r tests/requirements-nodeps.txt
  rm -f "$torch_pin"
}

case "$job" in
  demo) exec "$PY" -m geomcompile demo "$@" ;;
  test) install_test_deps; exec "$PY" -m pytest -q tests "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test [args]" >&2; exit 2 ;;
esac
