"""`minitron run` end to end on a tiny random model: every stage's output, the report, the
exported HF model, stage skipping and --from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minitron_nemo.config import load_config
from minitron_nemo.metrics import read_metrics
from minitron_nemo.stages import Pipeline
from tests.helpers import REPO, make_tiny_teacher_with_tokenizer, synthetic_text


def tiny_overrides(root: Path, run_dir: Path) -> list[str]:
    return [
        f"teacher={root / 'teacher_hf'}",
        f"run_dir={run_dir}",
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
        "distill.cpu_compile=off",  # 6 tiny steps: compiling would be most of the test's time
        "eval.tasks=[arc_easy]",
        "eval.limit=3",
    ]


def tiny_pipeline(root: Path, run_dir: Path, *extra: str) -> Pipeline:
    overrides = tiny_overrides(root, run_dir) + list(extra)
    return Pipeline(load_config(REPO / "recipes/smollm2_135m_cpu.yaml", overrides))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    text = synthetic_text()
    (root / "corpus.txt").write_text(text)
    make_tiny_teacher_with_tokenizer(root / "teacher_hf", text)
    (root / "teacher_hf" / "README.md").write_text("---\nlicense: mit\n---\n# tiny teacher\n")
    pipeline = tiny_pipeline(root, root / "run")
    pipeline.run()
    pipeline.root = root
    return pipeline


def copy_of(tiny_run, dest: Path) -> Path:
    """A copy of the complete tiny run (tests that change it work on their own copy)."""
    shutil.copytree(tiny_run.dir, dest, symlinks=True)
    return dest


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
    assert data["view_samples"]["test"] >= 6 and data["view_samples"]["calibration"] >= 12
    # calibration + test (data stage), train views of distill and scratch (same length: shared)
    assert len(list((d / "data" / "cache").glob("*description.txt"))) == 3


def test_every_export_carries_a_model_card(tiny_run):
    """README.md with the hub's metadata (base_model, library, license from the teacher's card,
    tags), how the model was made and the run's measured numbers, in every HF directory."""
    from minitron_nemo.report.model_card import front_matter

    d = tiny_run.dir
    teacher = str(tiny_run.root / "teacher_hf")
    for rel, row in (("export/student", "distilled"), ("export/scratch", "scratch"),
                     ("prune/hf", "pruned (no training)")):  # fmt: skip
        card = (d / rel / "README.md").read_text()
        meta = front_matter(d / rel / "README.md")
        assert meta["license"] == "mit" and meta["library_name"] == "transformers", rel
        assert meta["base_model"] == "teacher_hf" and "minitron-nemo" in meta["tags"], rel
        assert "## Measured in the run" in card and f"| {row}" in card, rel
    student = (d / "export" / "student" / "README.md").read_text()
    assert f"Teacher: `{teacher}`" in student and "hidden_size 64 -> 48" in student
    assert "Distillation: 6 steps x 4 samples x 32 tokens = 768 tokens" in student
    assert "above-chance accuracy recovered" in student and "| arc_easy (acc) | 0.25 |" in student


def test_report_has_the_table_and_plots(tiny_run):
    report = (tiny_run.dir / "report" / "report.md").read_text()
    assert "| model | params (M) | held-out loss | ppl | arc_easy acc / acc_norm |" in report
    for row in ("teacher", "pruned (no training)", "distilled", "scratch (LM, same tokens)"):
        assert f"| {row} |" in report
    for png in ("kd_vs_scratch.png", "kd_loss.png", "prune_heads.png", "prune_depth.png"):
        assert (tiny_run.dir / "report" / png).stat().st_size > 1000, png
    results = json.loads((tiny_run.dir / "eval" / "results.json").read_text())
    assert results["distilled"]["params"] < results["teacher"]["params"]
    # The tiny teacher is random, and the pruned student can already beat it on held-out text
    # (it does since heads are scored by taylor), so distillation is checked by moving the
    # student towards its teacher; distilled < pruned is the slow SmolLM2 tests' claim.
    teacher = results["teacher"]["heldout_loss"]
    distilled = abs(results["distilled"]["heldout_loss"] - teacher)
    assert distilled < abs(results["pruned (no training)"]["heldout_loss"] - teacher)


def test_exported_student_loads_with_transformers(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_run.dir / "export" / "student"
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 48 and model.config.intermediate_size == 64
    ids = tokenizer("The cat sees", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {
        stage: (run_dir / stage / "stage.json").stat().st_mtime_ns
        for stage in ("teacher", "data", "prune", "distill", "scratch", "export", "eval", "report")
    }


def test_complete_stages_are_skipped_and_from_reruns(tiny_run, tmp_path):
    run_dir = copy_of(tiny_run, tmp_path / "run")
    pipeline = tiny_pipeline(tiny_run.root, run_dir)
    before = _mtimes(run_dir)
    pipeline.run()
    assert _mtimes(run_dir) == before  # nothing changed: everything skipped
    pipeline.run(from_stage="prune", until="prune")
    after = _mtimes(run_dir)
    assert after["data"] == before["data"] and after["prune"] != before["prune"]


def test_changing_eval_reruns_only_eval_and_report(tiny_run, tmp_path):
    run_dir = copy_of(tiny_run, tmp_path / "run")
    pipeline = tiny_pipeline(tiny_run.root, run_dir, "eval.limit=2", "eval.benchmark_pruned=false")
    plan = pipeline.plan()
    assert {s for s, (action, _) in plan.items() if action != "skip"} == {"eval", "report"}
    assert plan["eval"][1] == "eval.benchmark_pruned true -> false, eval.limit 3 -> 2"
    before = _mtimes(run_dir)
    pipeline.run()
    after = _mtimes(run_dir)
    assert {s for s in before if before[s] != after[s]} == {"eval", "report"}
    # benchmark_pruned=false: the pruned model keeps its held-out loss, loses its benchmarks.
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["pruned (no training)"]["tasks"] == {}
    assert "heldout_loss" in results["pruned (no training)"]
    assert results["distilled"]["tasks"]["arc_easy"]["n"] == 2
    old = json.loads((tiny_run.dir / "eval" / "results.json").read_text())
    assert old["pruned (no training)"]["tasks"]["arc_easy"]["n"] == 3


def test_turning_prune_plots_off_reruns_nothing(tiny_run, tmp_path):
    run_dir = copy_of(tiny_run, tmp_path / "run")
    plan = tiny_pipeline(tiny_run.root, run_dir, "prune.plots=false").plan()
    assert {action for action, _ in plan.values()} == {"skip"}, plan


def test_changing_a_prune_target_reruns_prune_and_everything_after(tiny_run, tmp_path, caplog):
    run_dir = copy_of(tiny_run, tmp_path / "run")
    pipeline = tiny_pipeline(tiny_run.root, run_dir, "prune.ffn_hidden_size=48")
    before = _mtimes(run_dir)
    with caplog.at_level("INFO", logger="minitron_nemo.stages"):
        pipeline.run(until="prune")
    assert (
        "prune: prune.ffn_hidden_size 64 -> 48, rerunning prune and 5 later stages" in caplog.text
    )
    after = _mtimes(run_dir)
    assert after["teacher"] == before["teacher"] and after["data"] == before["data"]
    assert after["prune"] != before["prune"]
    report = json.loads((run_dir / "prune" / "prune_report.json").read_text())
    assert report["pruned_arch"]["ffn_hidden_size"] == 48
    # What is downstream of the new prune is stale, and `minitron status` says why.
    from minitron_nemo.status import run_status

    rows = {row["stage"]: row for row in run_status(run_dir)}
    assert rows["prune"]["state"] == "complete" and rows["data"]["state"] == "complete"
    for stage in ("distill", "scratch", "export", "eval", "report"):
        assert rows[stage]["state"] == "stale", rows[stage]
    assert rows["distill"]["why"] == "upstream prune changed"
    assert rows["scratch"]["headline"].startswith("step 6/6")


def test_teacher_cache_command_feeds_the_distill_stage(tiny_run, tmp_path, capsys):
    """`minitron teacher-cache` writes the top K of the recipe's distillation samples; the
    distill stage then runs from it without the teacher's weights (and scratch, which has no
    teacher, ignores the setting)."""
    from minitron_nemo.cli import main

    run_dir = copy_of(tiny_run, tmp_path / "run")
    topk = ["distill.kl=topk", "distill.top_k=16"]
    args = tiny_overrides(tiny_run.root, run_dir) + topk
    cache = tmp_path / "cache"
    recipe = str(REPO / "recipes/smollm2_135m_cpu.yaml")
    assert main(["teacher-cache", "--config", recipe, "--out", str(cache), *args]) == 0
    assert f"wrote {cache}: top 16 of 768 tokens" in capsys.readouterr().out
    shutil.rmtree(run_dir / "teacher" / "weights")  # the distill stage must not need them
    pipeline = tiny_pipeline(tiny_run.root, run_dir, *topk, f"distill.teacher_cache={cache}")
    assert pipeline.plan()["distill"][0] == "rerun" and pipeline.plan()["prune"][0] == "skip"
    pipeline.run(until="scratch")
    metrics = read_metrics(run_dir / "distill")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(m["loss_logits"] > 0 for m in metrics)


def test_moved_run_directory_resumes_and_reports(tiny_run, tmp_path):
    """An interrupted run (distill stopped after its step-3 checkpoint, nothing after it),
    moved elsewhere, resumes distillation from step 3 and reports from its own outputs."""
    run_dir = copy_of(tiny_run, tmp_path / "old")
    distill = run_dir / "distill"
    (distill / "DONE").unlink()
    shutil.rmtree(distill / "checkpoints" / "step_000006")
    (distill / "final.txt").unlink()
    for stage in ("export", "eval", "report"):
        shutil.rmtree(run_dir / stage)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    run_dir.rename(moved)
    pipeline = tiny_pipeline(tiny_run.root, moved)
    plan = pipeline.plan()
    assert plan["distill"][0] == "resume" and plan["prune"][0] == "skip"
    pipeline.run()
    metrics = read_metrics(moved / "distill")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert (moved / "distill" / "final.txt").read_text() == "distill/checkpoints/step_000006"
    # The report's token counts are the trainings' own: consumed samples x sequence length.
    report = json.loads((moved / "report" / "results.json").read_text())
    state = json.loads((moved / "distill/checkpoints/step_000006/train_state.json").read_text())
    assert state["consumed_samples"] == 6 * 4
    assert report["tokens"]["distilled"] == 6 * 4 * 32 == report["trainings"]["distill"]["tokens"]


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
        "distill.cpu_compile=off",
        "eval.tasks=[arc_easy]",
        "eval.limit=2",
    ]
    pipeline = Pipeline(load_config(REPO / "recipes/smollm2_135m_cpu.yaml", overrides))
    pipeline.run()
    corrected = pipeline.stage_dir("correct") / "train" / "checkpoints" / "step_000002"
    assert (corrected / "DONE").is_file() and pipeline.teacher_ckpt == corrected
    assert not (pipeline.stage_dir("correct") / "ckpt").exists()  # pointed at, not copied
    report = json.loads((pipeline.stage_dir("prune") / "prune_report.json").read_text())
    assert report["pruned_arch"]["ffn_hidden_size"] == 64
    config = json.loads((pipeline.stage_dir("distill") / "distill_config.json").read_text())
    assert config["mode"] == "distill"
    results = json.loads((pipeline.stage_dir("eval") / "results.json").read_text())
    assert set(results) == {"teacher", "teacher (corrected)", "pruned (no training)", "distilled"}
    assert results["teacher (corrected)"]["heldout_loss"] != results["teacher"]["heldout_loss"]
