#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a GPU machine that has torch and transformers but no network:
# this package, megatron-core and the few small dependencies the GPU check imports (installed
# there with --no-deps over the machine's own torch / transformers / numpy).
# usage: bash bench/make_wheelhouse.sh [DIR]   (default wheelhouse/, git-ignored; <= 60 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheelhouse}
rm -rf "$DIR" && mkdir -p "$DIR"
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$DIR" .
# pip wheel builds the one dependency that ships only as an sdist (antlr4 4.9.3, omegaconf's pin).
"$PY" -m pip wheel --no-deps -q -w "$DIR" \
  megatron-core==0.19.2 omegaconf antlr4-python3-runtime==4.9.3 psutil \
  pytest pluggy iniconfig tensorboard tensorboard-data-server absl-py markdown werkzeug \
  grpcio protobuf
SIZE=$(du -sm "$DIR" | cut -f1)
echo "wheelhouse $DIR: $(ls "$DIR" | wc -l) wheels, ${SIZE} MB"
if (( SIZE > 60 )); then echo "error: wheelhouse larger than 60 MB" >&2; exit 1; fi
