"""Architecture search (P1 section 3): enumerate, prune each candidate from one importance file,
score zero-shot, distill the best `top_k` briefly on the same batches, rank again, keep the best.

P1 reports that the ranking right after pruning does not predict the one after retraining and
that it settles within a few hundred steps; so the winner is the candidate with the lowest
held-out loss after `search.steps` distillation steps, not the best zero-shot one.

Work directory (resumable candidate by candidate; every piece is written atomically)::

    key.json                     what the work was computed from; a different key starts over
    teacher_cache/               the teacher's top-K logits of the short distillations' samples
                                 (search.teacher_cache_k; computed once, read by every candidate)
    cNN-<name>/ckpt/             the pruned candidate (megatron checkpoint, DONE)
    cNN-<name>/zero_shot.json    its held-out loss right after pruning
    cNN-<name>/distill/          the short distillation (resumes from its checkpoints)
    cNN-<name>/result.json       held-out loss along the short distillation
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from pathlib import Path

import torch

from minitron_nemo import atomic
from minitron_nemo.config import DistillConfig, PruneConfig
from minitron_nemo.data.datasets import DataSpec
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.prune.search_space import MIB, count_params, describe, enumerate_candidates

log = logging.getLogger(__name__)


ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "num_experts", "moe_ffn_hidden_size",
               "moe_shared_expert_size")  # fmt: skip


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (no ties expected; None for fewer than 2 items)."""
    n = len(a)
    if n < 2:
        return None
    ra = torch.tensor(a, dtype=torch.double).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.double).argsort().argsort().double()
    return float(1 - 6 * (ra - rb).pow(2).sum() / (n * (n * n - 1)))


def _work_key(imp_path: Path, cfg: PruneConfig, distill: DistillConfig, teacher: Path) -> dict:
    return {
        "importance_sha256": hashlib.sha256(imp_path.read_bytes()).hexdigest(),
        "prune": dataclasses.asdict(cfg),
        "distill": dataclasses.asdict(distill),
        "teacher": str(teacher),
    }


def search_distill_config(distill: DistillConfig, search) -> DistillConfig:
    """The run's distill settings for `search.steps` steps, a checkpoint every `eval_every`
    (all kept: each is scored), warmup shortened to at most a quarter of the steps, eager (a
    candidate's few steps would not pay back compiling its shapes: `cpu_compile` off). With the
    teacher cache the KD loss is the top-K one and hidden-state pairs are dropped (the cache
    holds the teacher's logits only)."""
    short = dataclasses.replace(
        distill,
        steps=search.steps,
        cpu_compile="off",
        warmup_steps=min(distill.warmup_steps, search.steps // 4),
        save_every=search.eval_every,
        keep_every=search.eval_every,
        keep_last=1,
    )
    if search.teacher_cache_k is not None:
        short = dataclasses.replace(
            short, kl="topk", top_k=search.teacher_cache_k, intermediate_pairs=[]
        )
    return short


def _teacher_cache(
    teacher_ckpt: Path, short: DistillConfig, search, data: DataSpec, work: Path,
    tp: int, pp: int, dp: int, ep: int = 1,
) -> dict:  # fmt: skip
    """Build (or finish) the cache of the short distillations' samples; its size and time."""
    import time

    from minitron_nemo.distill.teacher_cache import build_for_distillation, summary

    start = time.perf_counter()
    cache = build_for_distillation(
        teacher_ckpt, short, data, work / "teacher_cache", search.teacher_cache_dtype, tp, pp, dp,
        ep,
    )  # fmt: skip
    return {**summary(cache), "seconds": time.perf_counter() - start}


def _short_distillation(
    cand: dict, short: DistillConfig, data: DataSpec, teacher_ckpt: Path | None, work: Path,
    tp: int, pp: int, dp: int, hooks, ep: int = 1,
) -> dict:  # fmt: skip
    """Distill one candidate (resuming its own checkpoints) and score every checkpoint on the
    held-out split; scored checkpoints but the last are deleted (curve.json keeps their loss),
    so a killed search resumes with at most `steps / eval_every` checkpoints on disk."""
    from minitron_nemo.distill.checkpoints import complete_steps
    from minitron_nemo.distill.train import train
    from minitron_nemo.eval.heldout import heldout_losses

    d = cand["dir"]
    train(d / "ckpt", d / "distill", short, data, teacher_ckpt, tp=tp, pp=pp, dp=dp,
          resume=True, hooks=hooks, ep=ep)  # fmt: skip
    curve = {int(k): v for k, v in (atomic.read_json(d / "curve.json") or {}).items()}
    steps = complete_steps(d / "distill" / "checkpoints")
    todo = {str(step): path for step, path in steps if step not in curve}
    if todo:
        scored = heldout_losses(todo, data, work / ".curve.json", tp=tp, pp=pp, dp=dp, ep=ep)
        curve.update({int(k): v["heldout_loss"] for k, v in scored.items()})
        atomic.write_json(d / "curve.json", {str(k): v for k, v in curve.items()})
    for _, path in steps[:-1]:
        shutil.rmtree(path, ignore_errors=True)
    points = [[0, cand["zero_shot_loss"]]] + [[k, curve[k]] for k in sorted(curve)]
    result = {"curve": points, "final_loss": points[-1][1]}
    atomic.write_json(d / "result.json", result)
    return result


def run_search(
    source_ckpt: Path,
    imp_path: Path,
    imp: dict,
    cfg: PruneConfig,
    distill: DistillConfig,
    teacher_ckpt: Path,
    data: DataSpec,
    work: Path,
    choose_layers,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    hooks=None,
    ep: int = 1,
) -> dict:
    """Run (or resume) the search in `work`; returns the report with the winner's directory.
    `imp` is the importance file at `imp_path` as the prune stage loaded it (with the head score
    it chose); the file's bytes key the work. `hooks` (distill.trainer.TrainHooks) inject faults
    into the short distillations in tests."""
    from minitron_nemo.eval.heldout import heldout_losses
    from minitron_nemo.prune.select import select
    from minitron_nemo.prune.shard_slice import write_pruned_checkpoint

    search = cfg.search
    assert search is not None
    source = ModelArch.load(source_ckpt / "arch.yaml")
    key = _work_key(imp_path, cfg, distill, teacher_ckpt)
    if atomic.read_json(work / "key.json") != key:
        if work.exists():
            log.info("search: %s was computed from other inputs; starting over", work)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        atomic.write_json(work / "key.json", key)
    archs = enumerate_candidates(source, search, tp, pp)
    log.info("search: %d candidates in the budget", len(archs))
    cands = []
    for i, arch in enumerate(archs):
        d = work / f"c{i:02d}-{describe(arch, source)}"
        cands.append({"index": i, "name": describe(arch, source), "dir": d, "arch": arch})
        if not atomic.is_complete(d / "ckpt"):
            layers = choose_layers(source, arch, cfg, imp)
            plan = select(source, arch, imp["heads"], imp["neurons"], imp["channels"], layers,
                          imp.get("experts"), cfg.expert_score)  # fmt: skip
            shutil.rmtree(d / "ckpt", ignore_errors=True)
            write_pruned_checkpoint(
                source_ckpt, plan, imp["heads"], cfg.merge_pruned_heads, d / "ckpt", tp=tp, pp=pp
            )

    todo = {
        c["name"]: c["dir"] / "ckpt" for c in cands if not (c["dir"] / "zero_shot.json").exists()
    }
    if todo:
        scored = heldout_losses(todo, data, work / ".zero_shot.json", tp=tp, pp=pp, dp=dp, ep=ep)
        for c in cands:
            if c["name"] in scored:
                atomic.write_json(c["dir"] / "zero_shot.json", scored[c["name"]])
    for c in cands:
        c["zero_shot_loss"] = atomic.read_json(c["dir"] / "zero_shot.json")["heldout_loss"]
    by_zero = sorted(cands, key=lambda c: (c["zero_shot_loss"], c["index"]))
    for rank, c in enumerate(by_zero, 1):
        c["zero_shot_rank"] = rank
    kept = by_zero[: search.top_k]

    short = search_distill_config(distill, search)
    todo_distill = [c for c in kept if not (c["dir"] / "result.json").is_file()]
    short_teacher, cache_info = teacher_ckpt, atomic.read_json(work / "teacher_cache.json")
    if search.teacher_cache_k is not None:
        if todo_distill and cache_info is None:
            cache_info = _teacher_cache(teacher_ckpt, short, search, data, work, tp, pp, dp, ep)
            atomic.write_json(work / "teacher_cache.json", cache_info)
        short = dataclasses.replace(short, teacher_cache=str(work / "teacher_cache"))
        short_teacher = None
    for c in kept:
        result = atomic.read_json(c["dir"] / "result.json")
        if result is None:
            result = _short_distillation(c, short, data, short_teacher, work, tp, pp, dp, hooks, ep)
        c["curve"], c["final_loss"] = result["curve"], result["final_loss"]
    by_final = sorted(kept, key=lambda c: (c["final_loss"], c["zero_shot_rank"]))
    for rank, c in enumerate(by_final, 1):
        c["final_rank"] = rank
    best = by_final[0]
    rho = spearman([c["zero_shot_loss"] for c in kept], [c["final_loss"] for c in kept])
    rows = [
        {
            "name": c["name"],
            "arch": {a: getattr(c["arch"], a) for a in ARCH_FIELDS},
            "params": count_params(c["arch"], "total"),
            "non_embedding_params": count_params(c["arch"], "non_embedding"),
            "active_params": c["arch"].num_parameters(active=True),
            "memory_mb": c["arch"].memory_bytes(search.memory_seq_length,
                                                search.memory_batch_size) / MIB,
            "zero_shot_loss": c["zero_shot_loss"],
            "zero_shot_rank": c["zero_shot_rank"],
            "final_loss": c.get("final_loss"),
            "final_rank": c.get("final_rank"),
            "curve": c.get("curve"),
        }
        for c in by_zero
    ]  # fmt: skip
    why = (
        f"{best['name']}: lowest held-out loss after {search.steps} distillation steps "
        f"({best['final_loss']:.4f}) among the {len(kept)} best zero-shot candidates of "
        f"{len(cands)}; zero-shot it ranked {best['zero_shot_rank']}"
    )
    return {
        "candidates": rows,
        "num_candidates": len(cands),
        "top_k": len(kept),
        "steps": search.steps,
        "spearman_zero_shot_vs_distilled": rho,
        "chosen": best["name"],
        "chosen_dir": str(best["dir"]),
        "why": why,
        "teacher_cache": cache_info,
    }
