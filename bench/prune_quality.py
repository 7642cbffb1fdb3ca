"""Post-prune LM loss on SmolLM2-135M and real text (no retraining): importance vs random vs
magnitude for width pruning, contiguous block vs per-layer choice for depth pruning.

usage: .venv/bin/python bench/prune_quality.py [--calib 48] [--seq 128] [--drop 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from minitron_nemo.prune.quality import smollm2_prune_quality

    parser = argparse.ArgumentParser()
    parser.add_argument("--calib", type=int, default=48)
    parser.add_argument("--heldout", type=int, default=24)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--drop", type=int, default=8)
    parser.add_argument("--depth-samples", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = smollm2_prune_quality(
        args.calib, args.heldout, args.seq, args.drop, args.depth_samples
    )
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
