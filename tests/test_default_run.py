"""The embedded default (README command 1): `minitron run recipes/smollm2_135m_cpu.yaml` on
the real SmolLM2-135M, end to end, every stage, shortened (tests/conftest.py: `default_run`,
shared with the other real-model tests)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_default_run_distilled_beats_pruned(default_run):
    run_dir, result = default_run
    # The console ends with the results table, the share of the teacher's accuracy recovered and
    # the wall time per stage.
    tail = result.stdout.strip().splitlines()
    assert any(line.startswith("| distilled |") for line in tail[-40:]), result.stdout[-3000:]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    print(json.dumps(results, indent=2))
    distilled = results["distilled"]["heldout_loss"]
    assert distilled < results["pruned (no training)"]["heldout_loss"]
    assert "scratch (LM, same tokens)" not in results  # shortened: tests/conftest.py
    assert results["distilled"]["params"] < 0.7 * results["teacher"]["params"]
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Results" in report and (run_dir / "report" / "kd_loss.png").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "export" / "student")
