"""The export streams: exporting a ~1.1 GB (fp32) random Llama-shaped model grows the exporting
process's memory by far less than the model (one layer and the embedding at a time), and the
weights are bitwise the source's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from tests.helpers import REPO, make_tiny_hf

pytestmark = pytest.mark.slow

EXPORT = """
import json, sys, threading, time
from pathlib import Path
import minitron_nemo.convert.mcore_to_hf as m, megatron.core, transformers  # imports first

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

peak, done = [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)
before = rss_mb()
thread = threading.Thread(target=sample)
thread.start()
m.mcore_to_hf(Path(sys.argv[1]), Path(sys.argv[2]), max_shard_bytes=300 * 2**20)
done.set()
thread.join()
print(json.dumps({"before_mb": before, "peak_mb": peak[0]}))
"""


def test_export_memory_is_bounded_by_a_layer_not_the_model(tmp_path):
    hf = make_tiny_hf(
        "llama", tmp_path / "hf", vocab_size=32000, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
    )  # fmt: skip
    model_mb = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20
    hf_to_mcore(hf, tmp_path / "mc", tp=2)
    result = subprocess.run(
        [sys.executable, "-c", EXPORT, str(tmp_path / "mc"), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    growth = rss["peak_mb"] - rss["before_mb"]
    largest_mb = 32000 * 1024 * 4 / 2**20  # the embedding
    print(f"model {model_mb:.0f} MB; export grew the process by {growth:.0f} MB", rss)
    assert model_mb > 1000 and growth < 0.35 * model_mb and growth < 3 * largest_mb, rss
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) >= 4
    with safe_open(str(hf / "model.safetensors"), "pt") as src:
        for shard in shards:
            with safe_open(str(shard), "pt") as out:
                for name in out.keys():
                    assert torch.equal(out.get_tensor(name), src.get_tensor(name)), name
