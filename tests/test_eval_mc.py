"""Multiple-choice scoring: a hand-computed bigram example, and SmolLM2 on ARC-Easy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from minitron_nemo.eval.mc import Question, continuation_logprob, load_task, score_questions

ALPHABET = " abcdefghijklmnopqrstuvwxyz?:"


class CharTokenizer:
    """One token per character; pad id 0."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": [ALPHABET.index(c) + 1 for c in text]}


class BigramModel(torch.nn.Module):
    """logits[t] = table[token t]: p(next | previous) is known exactly."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor):
        return SimpleNamespace(logits=self.table[ids])


def _table() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(ALPHABET) + 1, len(ALPHABET) + 1, generator=g)


def test_continuation_logprob_by_hand():
    table = _table()
    tok, model = CharTokenizer(), BigramModel(table)
    logp = table.log_softmax(-1)

    def by_hand(context: str, cont: str) -> float:
        ids = tok(context + cont)["input_ids"]
        start = len(context)
        return sum(logp[ids[i - 1], ids[i]].item() for i in range(start, len(ids)))

    conts = [" ab", " zzz q", " c"]
    got = continuation_logprob(model, tok, "what:", conts)
    for value, cont in zip(got, conts, strict=True):
        assert value == pytest.approx(by_hand("what:", cont), abs=1e-5)


def test_acc_and_length_normalised_acc():
    table = torch.full((len(ALPHABET) + 1,) * 2, -5.0)
    a, b, space = (ALPHABET.index(c) + 1 for c in "ab ")
    table[space, a] = 5.0  # " a" is likely
    table[space, b] = 4.0  # " b..." starts almost as likely...
    table[b, b] = 5.0  # ...and continues very likely, so per character it wins
    tok, model = CharTokenizer(), BigramModel(table)
    q = Question("x", [" a", " bbbb"], gold=1)
    scores = continuation_logprob(model, tok, q.context, q.choices)
    assert scores[0] > scores[1]  # raw sum prefers the short answer
    assert scores[1] / 5 > scores[0] / 2  # per character the long one is better
    result = score_questions(model, tok, [q])
    assert result == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_load_task_filters_unconditioned_duplicates():
    questions = load_task("arc_easy", limit=50)
    assert len(questions) == 50
    assert all(
        0 <= q.gold < len(q.choices) and q.context.startswith("Question:") for q in questions
    )


@pytest.mark.slow
def test_smollm2_arc_easy_clearly_above_chance():
    from transformers import AutoTokenizer

    from minitron_nemo.data.sources import smollm2_hf_dir
    from minitron_nemo.eval.lm import load_hf_model

    hf_dir = smollm2_hf_dir()
    result = score_questions(
        load_hf_model(hf_dir), AutoTokenizer.from_pretrained(hf_dir), load_task("arc_easy", 200)
    )
    # 4 choices: chance is 0.25; with n = 200 its standard error is ~0.03.
    assert result["acc"] > 0.25 + 4 * math.sqrt(0.25 * 0.75 / 200), result
