"""`minitron run` end to end on a tiny random model: every stage's output, the report, the
exported HF model, stage skipping and --from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minitron_nemo.config import load_config
from minitron_nemo.stages import Pipeline
from tests.helpers import REPO, make_tiny_teacher_with_tokenizer, synthetic_text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    text = synthetic_text()
    (root / "corpus.txt").write_text(text)
    make_tiny_teacher_with_tokenizer(root / "teacher_hf", text)
    overrides = [
        f"teacher={root / 'teacher_hf'}",
        f"run_dir={root / 'run'}",
        f"data.source={root / 'corpus.txt'}",
        "data.seq_length=32",
        "data.calibration_samples=12",
        "data.heldout_samples=6",
        "prune.hidden_size=48",
        "prune.ffn_hidden_size=64",
        "prune.num_attention_heads=2",
        "prune.depth_scores=true",
        "prune.depth_eval_samples=4",
        "prune.micro_batch_size=4",
        "distill.steps=6",
        "distill.global_batch_size=4",
        "distill.micro_batch_size=2",
        "distill.warmup_steps=1",
        "distill.save_every=3",
        "distill.lr=3e-3",
        "eval.tasks=[arc_easy]",
        "eval.limit=3",
    ]
    cfg = load_config(REPO / "recipes/smollm2_135m_cpu.yaml", overrides)
    pipeline = Pipeline(cfg)
    pipeline.run()
    return pipeline


def test_every_stage_wrote_its_output(tiny_run):
    d = tiny_run.dir
    for stage in ("teacher", "data", "prune", "distill", "scratch", "export", "eval", "report"):
        assert (d / stage / "DONE").is_file(), stage
    assert (d / "config.yaml").is_file()
    for name in (
        "importance.pt",
        "prune_report.json",
        "plots/heads.png",
        "plots/neurons.png",
        "plots/depth.png",
        "plots/params.png",
        "hf/config.json",
        "ckpt/arch.yaml",
    ):
        assert (d / "prune" / name).is_file(), name
    assert (d / "distill" / "checkpoints" / "step_000006" / "DONE").is_file()
    assert list((d / "distill" / "tensorboard").glob("events.*"))
    # The text source was prepared into an indexed dataset with the teacher's tokenizer, and
    # megatron's indices were built once, before any rank started.
    data = json.loads((d / "data" / "data.json").read_text())
    (dataset,) = data["datasets"]
    assert dataset["prepared"] and not Path(dataset["prefix"]).is_absolute()
    assert (d / dataset["prefix"]).with_suffix(".bin").is_file()
    assert data["train_samples"] == 6 * 4 and data["split_samples"]["test"] >= 6
    assert len(list((d / "data" / "cache").glob("*description.txt"))) == 2


def test_report_has_the_table_and_plots(tiny_run):
    report = (tiny_run.dir / "report" / "report.md").read_text()
    assert "| model | params (M) | held-out loss | ppl | arc_easy acc / acc_norm |" in report
    for row in ("teacher", "pruned (no training)", "distilled", "scratch (LM, same tokens)"):
        assert f"| {row} |" in report
    for png in ("kd_vs_scratch.png", "kd_loss.png", "prune_heads.png", "prune_depth.png"):
        assert (tiny_run.dir / "report" / png).stat().st_size > 1000, png
    results = json.loads((tiny_run.dir / "eval" / "results.json").read_text())
    assert results["distilled"]["params"] < results["teacher"]["params"]
    assert results["distilled"]["heldout_loss"] < results["pruned (no training)"]["heldout_loss"]


def test_exported_student_loads_with_transformers(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_run.dir / "export" / "student"
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 48 and model.config.intermediate_size == 64
    ids = tokenizer("The cat sees", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_complete_stages_are_skipped_and_from_reruns(tiny_run):
    splits = tiny_run.dir / "data" / "data.json"
    importance = tiny_run.dir / "prune" / "importance.pt"
    before = splits.stat().st_mtime_ns, importance.stat().st_mtime_ns
    tiny_run.run(until="prune")
    assert (splits.stat().st_mtime_ns, importance.stat().st_mtime_ns) == before
    tiny_run.run(from_stage="prune", until="prune")
    assert splits.stat().st_mtime_ns == before[0]
    assert importance.stat().st_mtime_ns != before[1]


def test_teacher_correction_stage_feeds_prune_and_distill(tmp_path):
    """With teacher_correction enabled, the corrected teacher (LM-loss fine-tuned) is the one
    pruned, distilled from, exported and evaluated."""
    text = synthetic_text(300, seed=1)
    (tmp_path / "corpus.txt").write_text(text)
    make_tiny_teacher_with_tokenizer(tmp_path / "teacher_hf", text)
    overrides = [
        f"teacher={tmp_path / 'teacher_hf'}",
        f"run_dir={tmp_path / 'run'}",
        f"data.source={tmp_path / 'corpus.txt'}",
        "data.seq_length=32",
        "data.calibration_samples=8",
        "data.heldout_samples=4",
        "prune.ffn_hidden_size=64",
        "prune.hidden_size=null",
        "prune.depth_eval_samples=2",
        "distill.steps=2",
        "distill.global_batch_size=2",
        "distill.micro_batch_size=2",
        "distill.warmup_steps=1",
        "scratch=false",
        "teacher_correction.enabled=true",
        "teacher_correction.steps=2",
        "teacher_correction.warmup_steps=1",
        "eval.tasks=[arc_easy]",
        "eval.limit=2",
    ]
    pipeline = Pipeline(load_config(REPO / "recipes/smollm2_135m_cpu.yaml", overrides))
    pipeline.run()
    corrected = pipeline.stage_dir("correct") / "ckpt"
    assert (corrected / "DONE").is_file() and pipeline.teacher_ckpt == corrected
    report = json.loads((pipeline.stage_dir("prune") / "prune_report.json").read_text())
    assert report["pruned_arch"]["ffn_hidden_size"] == 64
    config = json.loads((pipeline.stage_dir("distill") / "distill_config.json").read_text())
    assert config["mode"] == "distill"
    results = json.loads((pipeline.stage_dir("eval") / "results.json").read_text())
    assert set(results) == {"teacher", "teacher (corrected)", "pruned (no training)", "distilled"}
    assert results["teacher (corrected)"]["heldout_loss"] != results["teacher"]["heldout_loss"]
