"""Post-prune LM loss on SmolLM2-135M and real text (no retraining), one axis at a time:
importance vs random (mean of --seeds seeds) vs weight magnitude for hidden, ffn, heads (with
P1's activation head score for comparison) and the default's combined target; every depth
method vs random and magnitude layer choices. Prints one markdown table (and the JSON).

usage: .venv/bin/python bench/prune_quality.py [--calib 64] [--heldout 32] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from minitron_nemo.prune.quality import quality_table, smollm2_prune_quality

    parser = argparse.ArgumentParser()
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--drop", type=int, default=8)
    parser.add_argument("--depth-samples", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = smollm2_prune_quality(
        args.calib, args.heldout, args.seq, args.drop, args.depth_samples, args.seeds
    )
    print(json.dumps(results, indent=2))
    print(quality_table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
