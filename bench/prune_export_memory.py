"""Convert, prune and export memory at two model depths: peak RSS follows one layer, not the
model.

For each depth (default 8 and 32 layers of a Llama-shaped model, hidden 1024, ffn 4096, vocab
32000, fp32: ~0.75 GB and ~2.2 GB) a random HF checkpoint is written, then each step runs in a
fresh process so its peak RSS is its own:
- convert: HF -> megatron checkpoint at TP=2 (`hf_to_mcore`);
- prune: the sliced checkpoint at TP=2 (`write_pruned_checkpoint`: each of the 2 ranks builds
  its shard of the pruned model from the source checkpoint one layer at a time), to hidden 768,
  ffn 2048 and 3/4 of the layers, with random importance;
- export: the pruned TP=2 checkpoint -> HF safetensors (`mcore_to_hf`, streamed).
Printed: wall seconds, peak RSS of the step's process (VmHWM) and of its largest child rank
(convert / prune start 2 ranks; a forked child starts from its parent's RSS, ~the imports), and
the step process's RSS right after imports, so the growth is what the step itself holds.

With --before TREE the prune and export steps also run from another checkout of this package
(e.g. `git worktree add /tmp/old c504b71`): its prune loaded the whole source in one process,
wrote an HF directory and re-sharded it; its export loaded the whole checkpoint.

usage: .venv/bin/python bench/prune_export_memory.py [--layers 8 32] [--before TREE]
       [--dir /tmp/minitron_pem]
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
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.prune.baselines import random_scores
from minitron_nemo.prune.select import select
try:
    from minitron_nemo.prune.plan import target_arch
except ImportError:  # an older tree (--before)
    from minitron_nemo.prune.select import target_arch
try:
    from minitron_nemo.prune.shard_slice import write_pruned_checkpoint
except ImportError:  # an older tree (--before)
    pass
from minitron_nemo.config import PruneConfig

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

step, root = sys.argv[1], Path(sys.argv[2])
after_imports = status_mb("VmRSS")
start = time.time()
if step == "convert":
    hf_to_mcore(root / "hf", root / "mc", tp=2)
elif step in ("prune", "prune_old"):
    source = ModelArch.load(root / "mc" / "arch.yaml")
    keep = source.num_layers * 3 // 4
    arch = target_arch(source, PruneConfig(hidden_size=768, ffn_hidden_size=2048,
                                           num_layers=keep), tp=2)
    scores = random_scores(source, 0)
    plan = select(source, arch, scores["heads"], scores["neurons"], scores["channels"],
                  list(range(keep)))
    if step == "prune":
        write_pruned_checkpoint(root / "mc", plan, scores["heads"], False, root / "pruned", tp=2)
    else:  # the code before issue 9: whole source in this process, HF round trip, re-shard
        from minitron_nemo.prune.stage import _slice_and_write
        _slice_and_write(root / "mc", source, plan, {"heads": scores["heads"]}, False,
                         root / "pruned_hf")
        hf_to_mcore(root / "pruned_hf", root / "pruned", tp=2)
else:
    mcore_to_hf(root / "pruned", root / "out")
seconds = time.time() - start
print(json.dumps({
    "seconds": seconds,
    "after_imports_mb": after_imports,
    "peak_mb": status_mb("VmHWM"),  # this process's own high-water mark
    "ranks_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


MAKE_HF = r"""
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
out, layers = Path(sys.argv[1]), int(sys.argv[2])
config = LlamaConfig(
    vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
    num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
    out, max_shard_size="500MB"
)
(out / "tokenizer_config.json").write_text("{}")
"""


def make_hf(out: Path, layers: int) -> float:
    """A random Llama-shaped HF checkpoint (written by a child process: this process stays
    small, and Linux carries a parent's peak RSS into the children it forks); its MB."""
    subprocess.run([sys.executable, "-c", MAKE_HF, str(out), str(layers)], check=True)
    return sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/minitron_pem"))
    parser.add_argument("--before", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for layers in args.layers:
        root = args.dir / f"L{layers}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        model_mb = make_hf(root / "hf", layers)
        steps = [("convert", "convert", REPO), ("prune", "prune", REPO), ("export", "export", REPO)]
        if args.before:
            steps += [("prune_old", "prune (before)", args.before),
                      ("export", "export (before)", args.before)]  # fmt: skip
        for step, label, tree in steps:
            shutil.rmtree(root / "out", ignore_errors=True)
            if step == "prune_old":
                shutil.rmtree(root / "pruned", ignore_errors=True)
            done = subprocess.run(
                [sys.executable, "-c", STEP, step, str(root)], capture_output=True, text=True,
                cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
            )  # fmt: skip
            if done.returncode:
                sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"layers": layers, "model_mb": round(model_mb), "step": label, **result})
            print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'layers':>6} {'model MB':>9} {'step':>16} {'s':>7} {'imports MB':>10} "
          f"{'peak MB':>8} {'rank peak MB':>12}")  # fmt: skip
    for r in rows:
        print(
            f"{r['layers']:>6} {r['model_mb']:>9} {r['step']:>16} {r['seconds']:>7.1f} "
            f"{r['after_imports_mb']:>10.0f} {r['peak_mb']:>8.0f} {r['ranks_peak_mb']:>12.0f}"
        )


if __name__ == "__main__":
    main()
