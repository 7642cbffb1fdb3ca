from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# The shortened default run: distillation and the scratch baseline 24 of their 60 steps, 40
# questions per benchmark, none for the pruned model before training (the full run's numbers
# are measured in the README; the tiny pipeline tests benchmark every model). It distills with
# KD + LM (P1's CLM+KLD) so that tests/test_distill_real.py compares it with an LM-only run of
# the same steps instead of distilling again (logits-only KD is what the tiny tests cover).
SHORTER_DEFAULT_RUN = [
    "distill.steps=24",
    "distill.lm_weight=1.0",
    "distill.save_every=12",
    "distill.warmup_steps=3",
    "eval.limit=40",
    "eval.benchmark_pruned=false",
]


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """`minitron run recipes/smollm2_135m_cpu.yaml` (README command 1) on the real SmolLM2-135M,
    every stage, once per session: the slow tests read its converted teacher, prepared data,
    pruned model and results instead of making their own. Returns (run_dir, completed process)."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    run_dir = tmp_path_factory.mktemp("default_run") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "minitron_nemo.cli", "run", "recipes/smollm2_135m_cpu.yaml",
         f"run_dir={run_dir}", *SHORTER_DEFAULT_RUN],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=2400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    return run_dir, result
