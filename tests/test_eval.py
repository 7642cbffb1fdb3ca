"""Evaluation: held-out loss by megatron-core on the ranks equals transformers'; benchmarks
through lm-evaluation-harness over the offline task data (lm-eval's own task configs)."""

from __future__ import annotations

import json

import pytest

from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from minitron_nemo.data.datasets import heldout_indices, heldout_reader
from minitron_nemo.eval.heldout import heldout_losses
from minitron_nemo.eval.lm import heldout_loss, load_hf_model
from tests.helpers import make_tiny_hf, random_documents, token_data_spec


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    hf = make_tiny_hf("llama", root / "hf", seed=4)
    hf_to_mcore(hf, root / "mc")
    data = token_data_spec(
        root / "data", random_documents(40, 30), seq_length=16, split="50,0,50", heldout_samples=9
    )
    return hf, root / "mc", data


@pytest.mark.parametrize(
    "tp,pp,dp",
    [(1, 1, 1), pytest.param(2, 1, 1, marks=pytest.mark.dist),
     pytest.param(1, 2, 1, marks=pytest.mark.dist), pytest.param(1, 1, 2, marks=pytest.mark.dist)],
    ids=["one", "tp2", "pp2", "dp2"],
)  # fmt: skip
def test_mcore_heldout_loss_equals_transformers(model_and_data, tmp_path, tp, pp, dp):
    hf, mc, data = model_and_data
    samples = heldout_reader(data).read(heldout_indices(data))  # 9: a short last micro-batch
    expected = heldout_loss(load_hf_model(hf), samples.split(4))
    result = heldout_losses({"m": mc}, data, tmp_path / "h.json", 4, tp, pp, dp)["m"]
    assert result["heldout_tokens"] == samples[:, 1:].numel()
    assert abs(result["heldout_loss"] - expected) < 1e-5, (result, expected)
    assert result["params"] == sum(p.numel() for p in load_hf_model(hf).parameters())


def test_task_configs_use_lm_evals_formats_over_local_data(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    from minitron_nemo.eval.benchmarks import fetch_task_data, write_task_configs

    fetch_task_data(["arc_easy", "mmlu"], ["anatomy", "virology"])
    names = write_task_configs(tmp_path, ["arc_easy", "mmlu"], ["anatomy", "virology"])
    assert names == ["minitron_arc_easy", "minitron_mmlu_anatomy", "minitron_mmlu_virology"]
    tasks = get_task_dict(names, TaskManager(include_path=str(tmp_path), include_defaults=False))
    arc = tasks["minitron_arc_easy"]
    assert len(arc.eval_docs) == 570  # ARC-Easy's validation split, from the local file
    doc = arc.eval_docs[0]
    assert (
        arc.doc_to_text(doc) == "Question: Which technology was developed most recently?\nAnswer:"
    )
    mmlu = tasks["minitron_mmlu_anatomy"]
    assert mmlu.config.num_fewshot == 5 and len(mmlu.fewshot_docs()) == 5
    assert "Answer:" in mmlu.doc_to_text(mmlu.eval_docs[0])


def test_eval_never_downloads(tmp_path, monkeypatch):
    from minitron_nemo.errors import MinitronError
    from minitron_nemo.eval.benchmarks import fetch_task_data

    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MinitronError, match="may not be downloaded now; run `minitron fetch`"):
        fetch_task_data(["piqa"], download=False)


@pytest.mark.slow
def test_lm_eval_on_smollm2_arc_easy_and_mmlu(tmp_path):
    """ARC-Easy 0-shot on the first 200 questions well above chance; MMLU 5-shot runs."""
    from minitron_nemo.data.sources import smollm2_hf_dir
    from minitron_nemo.eval.benchmarks import fetch_task_data, run_benchmarks, write_task_configs

    subjects = ["high_school_geography", "marketing", "us_foreign_policy"]
    fetch_task_data(["arc_easy", "mmlu"], subjects)
    hf = smollm2_hf_dir()
    arc = run_benchmarks(
        hf, tmp_path, write_task_configs(tmp_path, ["arc_easy"], None), 200, 16, "cpu"
    )["arc_easy"]
    print(json.dumps(arc))
    assert arc["n"] == 200 and arc["acc"] > 0.25 + 4 * arc["acc_stderr"], arc
    # 5 questions a subject: that it runs is the claim (63 s at 20 a subject, 16 s at 5)
    mmlu = run_benchmarks(
        hf, tmp_path / "m", write_task_configs(tmp_path / "m", ["mmlu"], subjects), 5, 8, "cpu"
    )
    print(json.dumps(mmlu["mmlu"]))
    assert mmlu["mmlu"]["n"] == 15 and 0 <= mmlu["mmlu"]["acc"] <= 1
    assert all(f"mmlu_{s}" in mmlu for s in subjects)


def test_recovery_table_is_the_share_of_the_teachers_above_chance_accuracy():
    from minitron_nemo.report.run_report import recovery_table

    def model(**tasks):
        return {
            "tasks": {t: dict(zip(("acc", "acc_norm"), v, strict=False)) for t, v in tasks.items()}
        }

    results = {
        "teacher": model(arc_easy=(0.45, 0.3), hellaswag=(0.3, 0.45), piqa=(0.505, 0.5)),
        "pruned (no training)": model(),
        "distilled": model(arc_easy=(0.35, 0.9), hellaswag=(0.9, 0.40), piqa=(0.6, 0.6)),
    }
    lines = recovery_table(results).splitlines()
    assert lines[0] == "| task (metric) | chance | teacher | distilled (recovered) |"
    assert lines[2].startswith("| arc_easy (acc) | 0.25 | 0.450") and "| 0.350 (50%) |" in lines[2]
    assert "hellaswag (acc_norm)" in lines[3] and "| 0.400 (75%) |" in lines[3]  # 0.15 / 0.20
    assert lines[4].endswith("| 0.600 (-) |")  # the teacher is at chance on piqa: no fraction
    assert recovery_table({"teacher": model(), "distilled": model()}) is None
