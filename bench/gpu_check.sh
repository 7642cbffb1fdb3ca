#!/usr/bin/env bash
# GPU checks for a lent accelerator: parity on CUDA (fp32, bf16, TE spec when importable).
# usage: bash bench/gpu_check.sh   (after scripts/setup.sh on the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv || true
.venv/bin/python -m pytest -q -s -m gpu tests/gpu
