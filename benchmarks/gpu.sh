#!/usr/bin/env bash
# One-shot GPU benchmark of geomcompile (issue 11): kernel parity against eager on CUDA, the
# optimizer step of ResNet-50 / VGG-16 / ResNet-56 (plain SGD fused and foreach, each geometry x
# eager / compile / triton, copy bound, CUDA-event medians, GB/s), the ResNet-56 batch-128 training
# step with the `resnet` policy against plain, and the host overhead with launches stubbed.
#
#   bash benchmarks/gpu.sh OUT_DIR                     # on a CUDA machine: < 8 minutes on one H100/H200
#   bash benchmarks/gpu.sh OUT_DIR --skip-compile      # without the compile backend's rows
#   bash benchmarks/gpu.sh OUT_DIR --device cpu --quick  # dry run of every part on CPU (numbers mean nothing)
#
# Uses the machine's preinstalled torch and Triton; installs nothing but this project (--no-deps),
# and only when `import geomcompile` does not already find this checkout. PYTHON picks the interpreter.
# JSON files land in OUT_DIR; docs/bench.md ("The GPU benchmark") describes them.
set -euo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu.sh OUT_DIR [--device cpu --quick] [--skip-compile]" >&2
    exit 2
fi
OUT=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"

QUICK=0
previous=
for arg in "$@"; do
    [ "$arg" = "--quick" ] && QUICK=1
    # On CPU the kernels run in Triton's interpreter, chosen before triton is first imported.
    if [ "$previous" = "--device" ] && [ "$arg" = "cpu" ]; then export TRITON_INTERPRET=1; fi
    previous=$arg
done

found=$("$PY" -c 'import os, geomcompile; print(os.path.dirname(os.path.dirname(os.path.abspath(geomcompile.__file__))))' 2>/dev/null || true)
if [ "$found" != "$ROOT" ]; then
    echo "gpu.sh: installing $ROOT (pip --no-deps, editable)"
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
} | tee "$OUT/environment.txt"

start=$SECONDS
status=0
"$PY" -m geomcompile.bench.gpu --out "$OUT" "$@" || status=$?    # 1: a parity case failed (listed above)

# Host overhead: CPU tensors, kernels in interpreter mode with every launch stubbed (a process of its own).
if [ "$QUICK" = 1 ]; then
    TRITON_INTERPRET=1 "$PY" -m geomcompile bench --host-overhead --model synthetic --synthetic 1x8 \
        --steps 3 --warmup 1 --no-progress --json "$OUT/host_overhead.json"
else
    TRITON_INTERPRET=1 "$PY" -m geomcompile bench --host-overhead --model resnet50 --no-progress \
        --json "$OUT/host_overhead_resnet50.json"
fi
echo "gpu.sh: done in $((SECONDS - start)) s; JSON in $OUT"
exit $status
