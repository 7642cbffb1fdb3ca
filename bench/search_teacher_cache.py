"""Teacher cost of the architecture search with and without the teacher top-K cache (CPU).

The CPU search recipe's candidates (SmolLM2-135M-Instruct teacher, ~71M-parameter students from
its budget; weights sliced with random importance: this measures time, not quality) are each
distilled N steps on the same batches, three ways, one after the other in this process:

    online forward KL   the teacher runs in every candidate's distillation (what the search
                        did before the cache; the run's kl: forward)
    online top-K        the same with kl topk (separates the loss from the teacher's forward)
    cache               the teacher's top K computed once (timed), every candidate reads it

Prints a markdown table: wall time of the 4 x N steps, mean step time, the cache build, and the
cache's disk size per million tokens at K = 64 and 128 (both built and measured).

usage: .venv/bin/python bench/search_teacher_cache.py [--steps 6] [--work /tmp/bench_cache]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path


def _candidates(teacher: Path, work: Path, recipe_search) -> list[Path]:
    """The search recipe's candidates, sliced from the teacher with random importance."""
    import torch

    from minitron_nemo.models.arch import ModelArch
    from minitron_nemo.prune.search_space import describe, enumerate_candidates
    from minitron_nemo.prune.select import select
    from minitron_nemo.prune.shard_slice import write_pruned_checkpoint

    source = ModelArch.load(teacher / "arch.yaml")
    g = torch.Generator().manual_seed(0)
    heads = torch.rand(source.num_layers, source.num_attention_heads, generator=g)
    neurons = torch.rand(source.num_layers, source.ffn_hidden_size, generator=g)
    channels = torch.rand(source.hidden_size, generator=g)
    out = []
    for arch in enumerate_candidates(source, recipe_search, 1, 1)[:4]:
        ckpt = work / "candidates" / describe(arch, source)
        if not (ckpt / "DONE").is_file():
            shutil.rmtree(ckpt, ignore_errors=True)
            plan = select(source, arch, heads, neurons, channels, list(range(arch.num_layers)))
            write_pruned_checkpoint(teacher, plan, heads, False, ckpt)
        out.append(ckpt)
    return out


def _distill_all(cands, out: Path, cfg, data, teacher) -> dict:
    from minitron_nemo.distill.train import train
    from minitron_nemo.metrics import read_metrics

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    step_times = []
    for ckpt in cands:
        train(ckpt, out / ckpt.name, cfg, data, teacher, resume=False)
        step_times += [m["step_time_s"] for m in read_metrics(out / ckpt.name)]
    return {
        "wall_s": time.perf_counter() - start,
        "step_s": sum(step_times) / len(step_times),
    }


def main() -> None:
    from minitron_nemo.config import load_config
    from minitron_nemo.distill.teacher_cache import build_for_distillation, summary
    from minitron_nemo.packaged import resolve_recipe
    from minitron_nemo.stages import Pipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_cache"))
    args = parser.parse_args()
    work = args.work
    cfg = load_config(resolve_recipe("smollm2_135m_cpu_search"), [f"run_dir={work / 'run'}"])
    pipeline = Pipeline(cfg)
    pipeline.run(until="data")  # teacher conversion + the Lee corpus (cached after the first)
    teacher = pipeline.teacher_ckpt
    cands = _candidates(teacher, work, cfg.prune.search)
    d = dataclasses.replace(
        cfg.distill, steps=args.steps, save_every=args.steps, log_every=1,
        warmup_steps=max(1, args.steps // 4),
    )  # fmt: skip
    data = dataclasses.replace(pipeline.data_spec(), train_samples=args.steps * d.global_batch_size)
    rows = {}
    rows["online forward KL"] = _distill_all(cands, work / "online_kl", d, data, teacher)
    topk = dataclasses.replace(d, kl="topk", top_k=64)
    rows["online top-K (K=64)"] = _distill_all(cands, work / "online_topk", topk, data, teacher)
    sizes = {}
    for k in (64, 128):
        shutil.rmtree(work / f"cache_k{k}", ignore_errors=True)
        start = time.perf_counter()
        cache = build_for_distillation(
            teacher, dataclasses.replace(d, top_k=k), data, work / f"cache_k{k}"
        )
        build_s = time.perf_counter() - start
        info = summary(cache)
        sizes[k] = {**info, "build_s": build_s,
                    "mb_per_million_tokens": info["bytes"] / info["tokens"]}  # fmt: skip
    cached = dataclasses.replace(topk, teacher_cache=str(work / "cache_k64"))
    rows["cache (K=64)"] = _distill_all(cands, work / "cached", cached, data, None)
    rows["cache (K=64)"]["wall_s_with_build"] = (
        rows["cache (K=64)"]["wall_s"] + sizes[64]["build_s"]
    )
    result = {"steps": args.steps, "candidates": [c.name for c in cands], "rows": rows,
              "cache": sizes, "tokens_per_step": d.global_batch_size * data.seq_length}  # fmt: skip
    print(json.dumps(result, indent=2))
    print(f"\n4 candidates ({', '.join(c.name for c in cands)}) x {args.steps} steps of "
          f"{result['tokens_per_step']} tokens:\n")  # fmt: skip
    print("| teacher | wall s (4 x N steps) | + cache build s | mean step s |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        build = f"{r['wall_s_with_build']:.1f}" if "wall_s_with_build" in r else "-"
        print(f"| {name} | {r['wall_s']:.1f} | {build} | {r['step_s']:.2f} |")
    print("\n| K | cache build s | bytes per token | MB per million tokens |")
    print("|---|---|---|---|")
    for k, s in sizes.items():
        print(f"| {k} | {s['build_s']:.1f} | {s['bytes'] / s['tokens']:.0f} | "
              f"{s['mb_per_million_tokens']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
