from __future__ import annotations

import os

import pytest
import torch

XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures start processes
def pytest_runtest_setup(item):
    """Two xdist workers on two cores (scripts/test.sh runs the fast tests with `-n 2`): one
    thread each, in this process and in every process its test starts, so the workers do not
    oversubscribe the cores."""
    if XDIST:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The shortened default run: distillation 16 of its 60 steps, 16 questions per benchmark, none
# for the pruned model before training (the full run's numbers are measured in the README; the
# tiny pipeline tests benchmark every model and run every stage). It distills with KD + LM (P1's
# CLM+KLD) so that tests/test_distill_real.py compares it with an LM-only run of the same steps
# instead of distilling again (logits-only KD is what the tiny tests cover), and it trains no
# scratch baseline: KD against scratch at equal tokens on this model is asserted by
# tests/test_token_efficiency.py, the scratch stage itself by tests/test_pipeline.py.
SHORTER_DEFAULT_RUN = [
    "distill.steps=16",  # 24 until the KD + LM margin over LM only was measured there too
    "distill.lm_weight=1.0",
    "scratch=false",
    "distill.save_every=8",
    "distill.warmup_steps=2",
    "eval.limit=16",
    "eval.benchmark_pruned=false",
]


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """`minitron run recipes/smollm2_135m_cpu.yaml` (README command 1) on the real SmolLM2-135M,
    shortened (above), once per session: the slow tests read its converted teacher, prepared
    data, pruned and distilled models and results instead of making their own. Returns
    (run_dir, completed process)."""
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
