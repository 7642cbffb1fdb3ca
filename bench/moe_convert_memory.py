"""MoE conversion and export memory at two model depths, at EP=1 and EP=2: a rank holds its
shard (its experts) plus one tensor, the export one layer; neither grows with the model.

For each depth (default 4 and 16 layers) a random Qwen3-MoE-shaped HF checkpoint (hidden 1024,
16 experts of width 512, top-4, vocab 32000, fp32, per-expert tensor names as on disk) is
written, then each step runs in a fresh process:
- convert at EP=1 (one rank holds every expert) and at EP=2 (2 ranks, 8 experts each);
- export the EP=2 checkpoint to HF safetensors (streamed, one layer in memory).
Printed as JSON lines: wall seconds, peak RSS (VmHWM) of the step's process, the largest peak
of its child ranks (RUSAGE_CHILDREN), and the checkpoint's size.

usage: .venv/bin/python bench/moe_convert_memory.py [--layers 4 16] [--dir /tmp/minitron_moe_mem]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STEP = r"""
import json, resource, sys, time
from pathlib import Path
import torch, megatron.core, transformers  # imports first: not counted as the step's memory
from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from minitron_nemo.convert.mcore_to_hf import mcore_to_hf

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

step, root = sys.argv[1], Path(sys.argv[2])
base = status_mb("VmRSS")
start = time.time()
if step == "convert_ep1":
    hf_to_mcore(root / "hf", root / "mc_ep1", ep=1, force=True)
elif step == "convert_ep2":
    hf_to_mcore(root / "hf", root / "mc_ep2", ep=2, force=True)
elif step == "export":
    mcore_to_hf(root / "mc_ep2", root / "out", force=True)
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"step": step, "seconds": round(time.time() - start, 1),
                  "rss_after_imports_mb": round(base), "peak_rss_mb": round(status_mb("VmHWM")),
                  "peak_child_rank_rss_mb": round(children)}))
"""

MAKE = r"""
import sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
layers, out = int(sys.argv[1]), Path(sys.argv[2])
config = AutoConfig.for_model(
    "qwen3_moe", vocab_size=32000, hidden_size=1024, intermediate_size=2048,
    moe_intermediate_size=512, num_experts=16, num_experts_per_tok=4, num_hidden_layers=layers,
    num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(out, max_shard_size="500MB")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/minitron_moe_mem"))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for layers in args.layers:
        root = args.dir / f"L{layers}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        subprocess.run([sys.executable, "-c", MAKE, str(layers), str(root / "hf")], check=True,
                       env=env)  # fmt: skip
        size_mb = sum(f.stat().st_size for f in (root / "hf").glob("*.safetensors")) / 2**20
        for step in ("convert_ep1", "convert_ep2", "export"):
            result = subprocess.run(
                [sys.executable, "-c", STEP, step, str(root)],
                check=True, capture_output=True, text=True, env=env,
            )  # fmt: skip
            record = json.loads(result.stdout.strip().splitlines()[-1])
            print(json.dumps({"layers": layers, "model_mb": round(size_mb), **record}), flush=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
