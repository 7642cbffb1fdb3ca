"""report/ of a run: report.md with the results table, per-stage wall time, and PNGs.

Every number comes from what the stages wrote (eval/results.json, each training's final
train_state.json and metrics.jsonl, prune_report.json, data.json, stage.json), never from the
current config: a report always describes the models it shows. Imports neither the training code
nor megatron.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from minitron_nemo.metrics import read_metrics
from minitron_nemo.report import plots

TRAINED_MODELS = {"distill": "distilled", "scratch": "scratch (LM, same tokens)"}
RECOVERY_CAPTION = (
    "Fraction of the teacher's above-chance accuracy recovered "
    "((model - chance) / (teacher - chance); teacher ± its standard error):"
)
STAGE_ORDER = ("teacher", "data", "correct", "prune", "distill", "scratch", "export", "eval")


def _task_cell(scores: dict | None) -> str:
    if scores is None:
        return "-"
    cell = f"{scores['acc']:.3f}"
    return cell + (f" / {scores['acc_norm']:.3f}" if "acc_norm" in scores else "")


def results_table(results: dict[str, dict], tokens: dict[str, int]) -> str:
    """Markdown table: one row per model (params, held-out loss / ppl, each benchmark)."""
    tasks = sorted({t for r in results.values() for t in r["tasks"] if not t.startswith("mmlu_")})
    header = [
        "model",
        "params (M)",
        "held-out loss",
        "ppl",
        *[f"{t} acc / acc_norm" if t != "mmlu" else "mmlu (5-shot) acc" for t in tasks],
        "training tokens",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [
            name,
            f"{r['params'] / 1e6:.1f}",
            f"{r['heldout_loss']:.3f}",
            f"{r['heldout_ppl']:.1f}",
            *[_task_cell(r["tasks"].get(t)) for t in tasks],
            f"{tokens[name]:,}" if name in tokens else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recovery_table(results: dict[str, dict]) -> str | None:
    """Markdown table: for each benchmark, the teacher's and every trained model's headline
    accuracy and the fraction of the teacher's above-chance accuracy each model keeps; None
    when the teacher or no other model has benchmark results."""
    from minitron_nemo.eval.benchmarks import CHANCE, HEADLINE_METRIC, headline, recovered_fraction

    teacher = results.get("teacher", {}).get("tasks", {})
    models = [n for n, r in results.items() if n != "teacher" and r["tasks"]]
    tasks = [t for t in teacher if t in CHANCE and any(t in results[n]["tasks"] for n in models)]
    if not tasks:
        return None
    header = ["task (metric)", "chance", "teacher", *[f"{n} (recovered)" for n in models]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in tasks:
        metric = HEADLINE_METRIC.get(t, "acc")
        stderr = teacher[t].get(f"{metric}_stderr", 0.0)
        cells = [
            f"{t} ({metric})",
            f"{CHANCE[t]:.2f}",
            f"{headline(t, teacher[t]):.3f} ± {stderr:.3f}",
        ]
        for n in models:
            scores = results[n]["tasks"].get(t)
            frac = recovered_fraction(t, scores, teacher[t]) if scores else None
            cells.append(
                "-" if scores is None
                else f"{headline(t, scores):.3f} ({'-' if frac is None else f'{frac:.0%}'})"
            )  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def training_summary(run_dir: Path, stage: str, seq_length: int) -> dict | None:
    """Steps, samples and tokens a training stage actually ran (its final checkpoint)."""
    pointer = run_dir / stage / "final.txt"
    if not pointer.is_file():
        return None
    final = run_dir / pointer.read_text().strip()
    state = json.loads((final / "train_state.json").read_text())
    config = _json(run_dir / stage / "distill_config.json") or {}
    return {
        "steps": state["step"],
        "samples": state["consumed_samples"],
        "tokens": state["consumed_samples"] * seq_length,
        "global_batch_size": config.get("global_batch_size"),
        "kl": config.get("kl"),
        "temperature": config.get("temperature"),
    }


# export of the run -> (row of the results table, hub tags)
EXPORTS = {
    "export/student": ("distilled", ["pruned", "knowledge-distillation"]),
    "export/scratch": ("scratch (LM, same tokens)", ["baseline"]),
    "export/teacher_corrected": ("teacher (corrected)", ["teacher-correction"]),
    "prune/hf": ("pruned (no training)", ["pruned"]),
}


def _write_model_cards(
    run_dir: Path, teacher: str | None, made: list[str], trainings: dict, table: str
) -> None:
    """README.md (hub metadata, how it was made, the results table) in every exported HF
    directory of the run; `made` is the report's teacher / pruning / distillation lines."""
    from minitron_nemo.report.model_card import run_card, teacher_metadata, write_card

    teacher = teacher or "smollm2"
    meta = teacher_metadata(teacher, None if teacher == "smollm2" else Path(teacher))
    pruned = [line for line in made if line.startswith(("Teacher", "Pruned"))]
    config = _json(run_dir / "distill" / "distill_config.json") or {}
    if config.get("lm_weight"):
        made = [*made, f"Loss: KD + {config['lm_weight']} x LM loss."]
    scratch = trainings.get("scratch")
    for rel, (row, tags) in EXPORTS.items():
        hf_dir = run_dir / rel
        if not hf_dir.is_dir():
            continue
        how = made if row == "distilled" else pruned
        if row.startswith("scratch") and scratch:
            how = [
                "The distilled student's architecture from random initialisation, trained with "
                f"the LM loss on the same {scratch['tokens']:,} tokens: the baseline."
            ]
        elif row.startswith("teacher"):
            how = [f"The teacher `{teacher}` fine-tuned with the LM loss (teacher correction)."]
        write_card(hf_dir, run_card(meta, row, how, table, run_dir.resolve().name, tags))


def write_report(run_dir: Path, out: Path) -> str:
    """Write report.md, results.json and the PNGs of the run in `run_dir` into `out`."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    data = json.loads((run_dir / "data" / "data.json").read_text())
    seq = data["seq_length"]
    trainings = {
        stage: summary
        for stage in TRAINED_MODELS
        if (summary := training_summary(run_dir, stage, seq)) is not None
    }
    tokens = {TRAINED_MODELS[stage]: s["tokens"] for stage, s in trainings.items()}
    table = results_table(results, tokens)
    recovery = recovery_table(results)
    recovery_section = None if recovery is None else f"{RECOVERY_CAPTION}\n\n{recovery}"
    seconds = {
        stage: record["seconds"]
        for stage in STAGE_ORDER
        if (record := _json(run_dir / stage / "stage.json")) and "seconds" in record
    }
    timing = "\n".join(
        ["| stage | wall time (s) |", "|---|---|"]
        + [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    )
    images = _curves(run_dir, trainings, seq, out)
    for png in sorted((run_dir / "prune" / "plots").glob("*.png")):
        shutil.copy2(png, out / f"prune_{png.name}")
        images.append(f"prune_{png.name}")
    prune_report = json.loads((run_dir / "prune" / "prune_report.json").read_text())
    teacher = (_json(run_dir / "teacher" / "stage.json") or {}).get("inputs", {}).get("teacher")
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
    dropped = prune_report["dropped_layers"]
    lines = [
        f"# minitron run: {run_dir.resolve().name}",
        "",
        f"Teacher: `{teacher}`. Pruned: {arch_line or 'no change'}"
        + (f"; dropped layers {dropped}" if dropped else "")
        + ".",
    ]
    if "distill" in trainings:
        kd = trainings["distill"]
        lines.append(
            f"Distillation: {kd['steps']} steps x {kd['global_batch_size']} samples x {seq} "
            f"tokens = {kd['tokens']:,} tokens; KD {kd['kl']} KL, T = {kd['temperature']}."
        )
    md = [
        *lines,
        "",
        "## Results",
        "",
        table,
        "",
        *([recovery_section, ""] if recovery_section else []),
        *search_section(prune_report.get("search")),
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
    card_table = "\n\n".join(x for x in (table, recovery_section) if x)
    _write_model_cards(run_dir, teacher, lines[2:], trainings, card_table)
    (out / "results.json").write_text(
        json.dumps(
            {"results": results, "seconds": seconds, "tokens": tokens, "trainings": trainings},
            indent=2,
        )
    )
    return "\n\n".join(x for x in (table, recovery, timing) if x)


def search_section(found: dict | None) -> list[str]:
    """The architecture search's table (every candidate; short-distillation columns for the
    kept ones), the rank correlation and the choice, as markdown lines."""
    if not found:
        return []
    moe = any(c["arch"].get("num_experts") for c in found["candidates"])
    head = "| candidate | layers | hidden | ffn | heads | "
    head += "experts | expert ffn | params | active | " if moe else "params | "
    head += f"memory | zero-shot loss | rank | loss after {found['steps']} steps | rank |"
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for c in found["candidates"]:
        a = c["arch"]
        after = f"{c['final_loss']:.4f} | {c['final_rank']}" if c["final_loss"] else "- | -"
        cells = [c["name"], a["num_layers"], a["hidden_size"], a["ffn_hidden_size"],
                 a["num_attention_heads"]]  # fmt: skip
        if moe:
            cells += [a["num_experts"], a["moe_ffn_hidden_size"], f"{c['params'] / 1e6:.2f}M",
                      f"{c['active_params'] / 1e6:.2f}M"]  # fmt: skip
        else:
            cells.append(f"{c['params'] / 1e6:.2f}M")
        cells += [f"{c['memory_mb']:,.1f} MiB", f"{c['zero_shot_loss']:.4f}", c["zero_shot_rank"]]
        rows.append("| " + " | ".join(str(x) for x in cells) + f" | {after} |")
    rho = found["spearman_zero_shot_vs_distilled"]
    cache = found.get("teacher_cache")
    teacher = "the teacher ran in every short distillation."
    if cache:
        teacher = (
            f"the short distillations read the teacher's top {cache['top_k']} logits from a "
            f"cache computed once in {cache['seconds']:.0f} s ({cache['tokens']:,} tokens, "
            f"{cache['bytes'] / 1e6:.1f} MB, {cache['bytes_per_token']:.0f} B per token)."
        )
    return [
        "## Architecture search",
        "",
        *rows,
        "",
        f"Spearman correlation of the zero-shot and post-distillation rankings (top "
        f"{found['top_k']}): {'n/a' if rho is None else f'{rho:.2f}'}. Chosen: {found['why']}.",
        f"Teacher: {teacher}",
        "",
    ]


def _curves(run_dir: Path, trainings: dict, seq: int, out: Path) -> list[str]:
    """Student LM loss under KD vs scratch, and the KD loss, against tokens seen."""
    kd = read_metrics(run_dir / "distill")
    if not kd or "distill" not in trainings:
        return []
    step_tokens = trainings["distill"]["global_batch_size"] * seq
    series = {
        "distillation (student LM loss)": (
            [m["step"] * step_tokens for m in kd],
            [m.get("loss_lm", float("nan")) for m in kd],
        )
    }
    scratch = read_metrics(run_dir / "scratch") if "scratch" in trainings else []
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
    return ["kd_vs_scratch.png", "kd_loss.png"]
