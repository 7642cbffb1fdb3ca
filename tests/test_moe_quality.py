"""bench/prune_quality_moe.py at a smaller budget, its claims asserted: on an MoE trained here
(held-out loss well below a unigram model's), the default expert score (taylor) beats random
experts and routing frequency and ties or beats REAP when half the experts go (alone and with
half the expert width); expert-width and shared-expert pruning beat random neurons; a short
distillation recovers the pruned MoE, and a dense student of the MoE's active size made from it
distills too. With 2 of 8 experts left no score is reliably better than random at this size:
two trainings that differ only in thread count (so in rounding) ordered the scores differently
there, so that row is reported, not asserted (docs/moe.md).

The budget (measured, 170 s on 2 cores): a 1024-token vocabulary and a shared expert of width 64
(so that the routed experts carry most of the MLP's work), 500 training steps of one
micro-batch of 16 x 128 tokens (held-out 5.15 against the unigram model's 6.06), 3 random
seeds, 30 distillation steps. The bench's documented table uses 4096 tokens, width 256 and
2000 steps of two micro-batches of 8 (12 min)."""

from __future__ import annotations

import pytest

from tests.helpers import load_bench

pytestmark = pytest.mark.slow

# "ties": within this of the other score's held-out loss; the random seeds at experts 8 -> 4
# span 0.04, so a smaller difference is not an ordering
TIE = 0.03
BUDGET = ["--steps", "500", "--vocab", "1024", "--shared", "64", "--seeds", "3",
          "--distill-steps", "30", "--train-micro-batch", "16"]  # fmt: skip


def test_default_expert_score_beats_random_and_frequency_and_ties_reap(tmp_path):
    results = load_bench("prune_quality_moe").main(["--work", str(tmp_path), *BUDGET])
    assert results["trained"] < results["unigram"] - 0.5  # trained: experts can be ranked
    rows = {row["target"]: row for row in results["rows"]}
    for target, row in rows.items():
        if target == "experts 8->2":  # which 2 of 8 matters less than that 6 are gone
            continue
        if "frequency" in row:  # an expert-count target: every score was run
            assert row["taylor"] < row["frequency"], (target, row)
            assert row["taylor"] < row["random"], (target, row)
            assert row["taylor"] <= row["reap"] + TIE, (target, row)
        else:  # expert width or shared-expert width: our neuron scores against random
            assert row["reap"] < row["random"], (target, row)
    d = results["distilled"]
    assert d["distilled"] < d["pruned"]
    assert d["dense_distilled"] < d["dense"]
