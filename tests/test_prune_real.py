"""SmolLM2-135M on real text: importance-based width pruning beats random and magnitude
pruning (LM loss right after pruning); depth block vs per-layer choices are reported."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_importance_beats_random_and_magnitude_on_smollm2(tmp_path):
    from minitron_nemo.prune.quality import smollm2_prune_quality

    results = smollm2_prune_quality(calib=36, heldout=16, seq=128, drop=8, depth_samples=4)
    print(json.dumps({k: v for k, v in results.items() if k != "block_importance"}, indent=2))
    width = results["width"]
    assert width["importance"] < width["random"], width
    assert width["importance"] < width["magnitude"], width
    depth = results["depth"]
    assert len(depth) == 3 and all(len(v["dropped"]) == 8 for v in depth.values())
    block = depth["block (LM loss)"]["dropped"]
    assert block == list(range(block[0], block[0] + 8))  # contiguous
