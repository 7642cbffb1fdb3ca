"""`minitron status RUN_DIR`: every stage complete / stale (why) / interrupted / missing, its wall
time and the headline numbers so far, read from the stage outputs (no torch, no megatron).

The run's own `config.yaml` (the last resolved config) gives the fingerprints the stages are
compared with, exactly as the next `minitron run` with that config would.
"""

from __future__ import annotations

import json
from pathlib import Path

from minitron_nemo.errors import MinitronError
from minitron_nemo.metrics import read_metrics


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _headline(run_dir: Path, stage: str) -> str:
    """A few numbers a stage has produced so far."""
    d = run_dir / stage
    if stage == "teacher" and (d / "arch.yaml").is_file():
        from minitron_nemo.models.arch import ModelArch

        arch = ModelArch.load(d / "arch.yaml")
        return f"{arch.family}, {arch.num_parameters() / 1e6:.1f}M params, {arch.num_layers} layers"
    if stage == "data" and (data := _json(d / "data.json")):
        docs = sum(x["documents"] for x in data["datasets"])
        tokens = sum(x["tokens"] for x in data["datasets"])
        return f"{len(data['datasets'])} dataset(s), {docs:,} documents, {tokens:,} tokens"
    if stage == "prune" and (report := _json(d / "prune_report.json")):
        before, after = report["params_before"]["total"], report["params_after"]["total"]
        return f"{before / 1e6:.1f}M -> {after / 1e6:.1f}M params"
    if stage in ("correct", "distill", "scratch"):
        out = d / "train" if stage == "correct" else d
        metrics = read_metrics(out)
        config = _json(out / "distill_config.json") or {}
        if metrics:
            last = metrics[-1]
            return f"step {last['step']}/{config.get('steps', '?')}, loss {last['loss']:.4g}"
    if stage == "eval" and (results := _json(d / "results.json")):
        return "; ".join(f"{name} {r['heldout_loss']:.3f}" for name, r in results.items())
    if stage == "report" and (d / "report.md").is_file():
        return str(d / "report.md")
    return ""


def run_status(run_dir: Path) -> list[dict]:
    """One row per stage: stage, state, why, seconds, headline."""
    from minitron_nemo.config import load_config
    from minitron_nemo.stages import STAGES, Pipeline, read_record

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise MinitronError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(config, [f"run_dir={run_dir}"], teacher_checks=False)
    pipeline = Pipeline(cfg)
    plan = pipeline.plan()
    rows = []
    for stage in STAGES:
        if stage not in plan:
            rows.append({"stage": stage, "state": "disabled", "why": "", "seconds": None})
            continue
        action, why = plan[stage]
        state = {
            "skip": "complete",
            "rerun": "stale",
            "resume": "interrupted",
            "run": "missing",
        }[action]
        if state == "missing" and pipeline.stage_dir(stage).exists():
            state = "incomplete"
        record = read_record(pipeline.stage_dir(stage)) or {}
        rows.append(
            {
                "stage": stage,
                "state": state,
                "why": "" if state in ("complete", "missing") else why,
                "seconds": record.get("seconds"),
                "headline": _headline(run_dir, stage),
            }
        )
    return rows


def format_status(rows: list[dict]) -> str:
    lines = ["| stage | state | wall time (s) | numbers |", "|---|---|---|---|"]
    for row in rows:
        state = row["state"] + (f" ({row['why']})" if row["why"] else "")
        seconds = f"{row['seconds']:.1f}" if row.get("seconds") is not None else "-"
        lines.append(f"| {row['stage']} | {state} | {seconds} | {row.get('headline', '')} |")
    return "\n".join(lines)
