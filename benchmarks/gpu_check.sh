#!/usr/bin/env bash
# One short GPU check (under 5 minutes on a machine with an NVIDIA GPU): a ResNet18 teacher round
# at 224 px on CUDA vs the CPU, mixed precision on/off, DP-SGD on CUDA, and a CUDA distillation
# with ONNX export of the student; prints a table. See benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [--images 256] [--json]
#
# Without CUDA it stops at once (exit 2) and says that nothing was measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU is visible to PyTorch on this machine ($("$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda)')); nothing was run." >&2
    exit 2
fi
exec timeout 300 "$PYTHON" benchmarks/gpu_check.py "$@"
