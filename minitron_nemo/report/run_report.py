"""report/ of a run: report.md with the results table, per-stage wall time, and PNGs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from minitron_nemo.distill.train import read_metrics
from minitron_nemo.report import plots

if TYPE_CHECKING:
    from minitron_nemo.stages import Pipeline


def results_table(results: dict[str, dict], tokens: dict[str, int]) -> str:
    """Markdown table: one row per model (params, held-out loss / ppl, each benchmark)."""
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    header = [
        "model",
        "params (M)",
        "held-out loss",
        "ppl",
        *[f"{t} acc / acc_norm" for t in tasks],
        "training tokens",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [
            name,
            f"{r['params'] / 1e6:.1f}",
            f"{r['heldout_loss']:.3f}",
            f"{r['heldout_ppl']:.1f}",
            *[
                f"{r['tasks'][t]['acc']:.3f} / {r['tasks'][t]['acc_norm']:.3f}"
                if t in r["tasks"]
                else "-"
                for t in tasks
            ],
            f"{tokens.get(name, 0):,}" if name in tokens else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(pipeline: Pipeline, out: Path) -> str:
    cfg = pipeline.cfg
    results = json.loads((pipeline.stage_dir("eval") / "results.json").read_text())
    seq = cfg.data.seq_length
    train_tokens = cfg.distill.steps * cfg.distill.global_batch_size * seq
    tokens = {"distilled": train_tokens}
    if cfg.scratch:
        tokens["scratch (LM, same tokens)"] = train_tokens
    table = results_table(results, tokens)
    seconds = pipeline.stage_seconds()
    timing = "\n".join(
        ["| stage | wall time (s) |", "|---|---|"]
        + [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    )

    images = []
    kd = read_metrics(pipeline.stage_dir("distill"))
    scratch = read_metrics(pipeline.stage_dir("scratch")) if cfg.scratch else []
    step_tokens = cfg.distill.global_batch_size * seq
    if kd:
        series = {
            "distillation (student LM loss)": (
                [m["step"] * step_tokens for m in kd],
                [m.get("loss_lm", float("nan")) for m in kd],
            )
        }
        if scratch:
            series["scratch (LM loss)"] = (
                [m["step"] * step_tokens for m in scratch],
                [m["loss_lm"] for m in scratch],
            )
        plots.curves(
            series,
            "training LM loss: distilled student vs scratch",
            "tokens",
            "cross entropy",
            out / "kd_vs_scratch.png",
        )
        plots.curves(
            {
                "KD loss (KL teacher || student)": (
                    [m["step"] * step_tokens for m in kd],
                    [m.get("loss_logits", m["loss"]) for m in kd],
                )
            },
            "distillation loss",
            "tokens",
            "loss",
            out / "kd_loss.png",
        )
        images += ["kd_vs_scratch.png", "kd_loss.png"]
    prune_plots = pipeline.stage_dir("prune") / "plots"
    for png in sorted(prune_plots.glob("*.png")):
        shutil.copy2(png, out / f"prune_{png.name}")
        images.append(f"prune_{png.name}")
    prune_report = json.loads((pipeline.stage_dir("prune") / "prune_report.json").read_text())
    arch_line = ", ".join(
        f"{k} {prune_report['source_arch'][k]} -> {prune_report['pruned_arch'][k]}"
        for k in (
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "num_layers",
        )
        if prune_report["source_arch"][k] != prune_report["pruned_arch"][k]
    )
    md = [
        f"# minitron run: {cfg.name}",
        "",
        f"Teacher: `{cfg.teacher}`. Pruned: {arch_line or 'no change'}"
        + (
            f"; dropped layers {prune_report['dropped_layers']}"
            if prune_report["dropped_layers"]
            else ""
        )
        + ".",
        f"Distillation: {cfg.distill.steps} steps x {cfg.distill.global_batch_size} samples x "
        f"{seq} tokens = {train_tokens:,} tokens; KD {cfg.distill.kl} KL, "
        f"T = {cfg.distill.temperature}.",
        "",
        "## Results",
        "",
        table,
        "",
        "## Wall time per stage",
        "",
        timing,
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in images],
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    (out / "results.json").write_text(
        json.dumps({"results": results, "seconds": seconds, "tokens": tokens}, indent=2)
    )
    return table + "\n\n" + timing
