#!/usr/bin/env bash
# Build and warm the Triton block-sparse attention kernels for every task shape in config.py.
# On a machine without CUDA there is nothing to build: training uses the torch backend, and this script
# only checks the kernels in Triton's CPU interpreter. Extra arguments go to `python -m sat.warmup`
# (e.g. --dtypes bf16,tf32).
#   ./compile.sh --report --out bench/results/compile_report-triton-$(python -c 'import triton; print(triton.__version__)').txt
# builds, on any machine, what training launches for sm_80 and sm_90 and reports shared memory, registers and
# spills per kernel (docs/gpu.md); it fails on a spill.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

machine=$("$PYTHON" -c "
import importlib.util, torch
if importlib.util.find_spec('triton') is None:
    print('no-triton')
else:
    print('cuda' if torch.cuda.is_available() else 'cpu')")

if [[ "$machine" != no-triton && " $* " == *" --report "* ]]; then
    exec "$PYTHON" -m sat.warmup "$@"
fi
case "$machine" in
    no-triton)
        echo "Triton is not installed: the torch attention backend will be used (pip install triton to build)."
        ;;
    cuda)
        "$PYTHON" -m sat.warmup "$@"
        ;;
    *)
        echo "No CUDA GPU: training will use the torch attention backend; checking the Triton kernels in the" \
             "CPU interpreter instead (./compile.sh --report compiles them for sm_80 and sm_90 without a GPU)."
        TRITON_INTERPRET=1 "$PYTHON" -m sat.warmup --smoke
        ;;
esac
