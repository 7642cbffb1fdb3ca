"""The embedded default (README command 1): `minitron run recipes/smollm2_135m_cpu.yaml` on
the real SmolLM2-135M, end to end, every stage, with the distillation and the scratch baseline
shortened to 24 of their 60 steps and 40 questions per benchmark (~12.5 min instead of ~21 on 2
cores; the full run's numbers are measured in the README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow
SHORTER = ["distill.steps=24", "distill.save_every=12", "distill.warmup_steps=3", "eval.limit=40"]


def test_default_run_distilled_beats_pruned_and_scratch(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "minitron_nemo.cli",
            "run",
            "recipes/smollm2_135m_cpu.yaml",
            f"run_dir={run_dir}",
            *SHORTER,
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    # The console ends with the results table and the wall time per stage.
    tail = result.stdout.strip().splitlines()
    assert any(line.startswith("| distilled |") for line in tail[-20:]), result.stdout[-3000:]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    print(json.dumps(results, indent=2))
    distilled = results["distilled"]["heldout_loss"]
    assert distilled < results["pruned (no training)"]["heldout_loss"]
    assert distilled < results["scratch (LM, same tokens)"]["heldout_loss"]
    assert results["distilled"]["params"] < 0.7 * results["teacher"]["params"]
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Results" in report and (run_dir / "report" / "kd_vs_scratch.png").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "export" / "student")
