#!/usr/bin/env bash
# Create .venv (Python 3.12) and install minitron-nemo with its dev and GGUF extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY="$candidate"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "error: Python 3.12 not found (megatron-core 0.19 needs it); set PYTHON=/path/to/python3.12" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The install goes through uv (from PyPI): on 2 cores, from an empty cache, the whole set (the
# CUDA build of torch is ~3 GB) takes ~55 s against pip's ~160 s. Bytecode is compiled at
# install, as pip does: where PYTHONDONTWRITEBYTECODE is set (these machines set it) every
# process would otherwise compile torch's modules again (`import torch, megatron.core,
# transformers` 14.2 s instead of 5.5 s). uv reads no pip configuration, so pip's constraint
# files (PIP_CONSTRAINT, /etc/xdg/pip) are passed on. MINITRON_SETUP_PIP=1 installs with pip.
if [ "${MINITRON_SETUP_PIP:-0}" = 1 ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev,gguf]"
else
  .venv/bin/python -m pip install --quiet uv
  constraints=()
  for file in ${PIP_CONSTRAINT:-} /etc/xdg/pip/constraints.txt; do
    [ -f "$file" ] && constraints+=(--constraint "$file")
  done
  .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python "${constraints[@]}" \
    -e ".[dev,gguf]"
fi
.venv/bin/python -c "import megatron.core, transformers, torch; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
