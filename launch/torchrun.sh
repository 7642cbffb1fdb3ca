#!/usr/bin/env bash
# Single node, N GPUs: run a recipe with its ranks on this node's GPUs.
# usage: launch/torchrun.sh NGPUS RECIPE [key=value ...]
#
# minitron starts its own ranks (tp x pp x dp processes, nccl on GPU, gloo on CPU) for every
# stage, the way torchrun would, so no torchrun wrapper is needed around it: this script checks
# the GPU count and sets the data-parallel size so that tp x pp x dp = NGPUS.
set -euo pipefail
NGPUS=${1:?usage: launch/torchrun.sh NGPUS RECIPE [key=value ...]}
RECIPE=${2:?usage: launch/torchrun.sh NGPUS RECIPE [key=value ...]}
shift 2
HERE="$(cd "$(dirname "$0")/.." && pwd)"
MINITRON="${MINITRON:-$HERE/.venv/bin/minitron}"
command -v "$MINITRON" >/dev/null 2>&1 || MINITRON=minitron
read -r TP PP < <("$MINITRON" validate "$RECIPE" "${@/#/--override=}" >/dev/null && \
  python3 -c "import yaml,sys; from pathlib import Path
def load(p):
    d = yaml.safe_load(Path(p).read_text()) or {}
    b = d.pop('base', None)
    base = load(Path(p).parent / b) if b else {}
    par = {**base.get('parallel', {}), **d.get('parallel', {})}
    return {'parallel': par}
par = load(sys.argv[1])['parallel']; print(par.get('tp', 1), par.get('pp', 1))" "$RECIPE")
if (( NGPUS % (TP * PP) )); then
  echo "error: $NGPUS GPUs are not a multiple of tp x pp = $TP x $PP" >&2; exit 1
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec "$MINITRON" run "$RECIPE" "parallel.dp=$(( NGPUS / (TP * PP) ))" "$@"
