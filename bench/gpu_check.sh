#!/usr/bin/env bash
# Every GPU check in one command, on a GPU machine with torch + transformers and no network.
#   here:   bash bench/make_wheelhouse.sh          (wheelhouse/, <= 60 MB, carried to the GPU)
#   there:  bash bench/gpu_check.sh [OUT_DIR]      (about 8 minutes on one H100 / H200)
# 1. parity fp32 / bf16, local SDPA spec and TE spec (when TE imports), Llama, Qwen3 and two
#    MoE families (TEGroupedMLP + alltoall under TE); grouped experts save the sequential
#    format  -> tests/gpu
# 2. a few distillation steps: bf16, distributed optimizer, TE spec if importable, resume; an
#    MoE student with its router loss
# 3. FP8 (hybrid) student steps when TE imports
# 4. bench/kd_throughput.py vs a plain HF KD loop, random weights, bf16:
#    1.2B -> 0.74B at seq 2048 x 4, and Llama-3.1-8B -> 4.5B width at seq 4096 x 2
# Prints one table at the end (and writes OUT_DIR/gpu_check.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ ! -x .gpu-venv/bin/python ]; then
  python3 -m venv --system-site-packages .gpu-venv   # the machine's torch / transformers
  .gpu-venv/bin/pip install --no-index --no-deps -q wheelhouse/*.whl
fi
PY=.gpu-venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, megatron.core, importlib.util as u; print('torch', torch.__version__, 'mcore', megatron.core.__version__, 'TE', u.find_spec('transformer_engine') is not None)" | tee -a "$OUT/gpu.txt"

timeout 480 $PY -m pytest -q -rA -m gpu tests/gpu 2>&1 | tee "$OUT/pytest.txt" | tail -30
for shape in "1.2b --seq 2048 --mbs 4" "8b --seq 4096 --mbs 2"; do
  set -- $shape
  timeout 420 $PY bench/kd_throughput.py --shape $shape --dtype bf16 --steps 5 --rounds 1 \
    --work "/tmp/kd_bench_$1" > "$OUT/kd_$1.json" 2> "$OUT/kd_$1.log" || echo "kd bench $1 failed (see $OUT/kd_$1.log)"
done

$PY - "$OUT" <<'PY' | tee "$OUT/gpu_check.md"
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| check | result |\n|---|---|")
print(f"| device | {(out / 'gpu.txt').read_text().strip().replace(chr(10), '; ')} |")
for line in (out / "pytest.txt").read_text().splitlines():
    m = re.match(r"(PASSED|FAILED|SKIPPED|ERROR) (\S+)(.*)", line)
    if m:
        print(f"| {m.group(2).split('::')[-1]} | {m.group(1)}{m.group(3)} |")
for f in sorted(out.glob("kd_*.json")):
    try:
        r = json.loads(f.read_text())
    except ValueError:
        print(f"| {f.stem} | no result |")
        continue
    print(f"| {f.stem}: {r['teacher_params']/1e9:.2f}B -> {r['student_params']/1e9:.2f}B, seq "
          f"{r['seq']} x {r['micro_batch']} | ours {r['minitron']['tokens_per_s']:,.0f} tok/s vs HF "
          f"{r['hf']['tokens_per_s']:,.0f} = {r['speedup']:.2f}x; memory {r['minitron']['peak_memory_gib']:.1f}"
          f" vs {r['hf']['peak_memory_gib']:.1f} GiB = {r['memory_ratio']:.2f}x; MFU {r['minitron']['mfu']:.2f} |")
PY
