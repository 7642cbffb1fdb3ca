"""bench/token_efficiency.py: the multiple of scratch tokens is interpolated right on a made-up
curve; the bench runs end to end at two tiny budgets from the default run's artefacts and a
rerun reuses every point and the reference lines."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_bench


def test_scratch_tokens_are_interpolated_in_log_tokens():
    bench = load_bench("token_efficiency")
    # loss = 12 - log10(tokens): 9 at 1k, 8 at 10k, 7 at 100k tokens
    scratch = [(1e5, 7.0), (1e3, 9.0), (1e4, 8.0)]
    assert math.isclose(bench.tokens_to_reach(scratch, 7.5), 10**4.5, rel_tol=1e-9)
    assert math.isclose(bench.tokens_to_reach(scratch, 8.0), 1e4, rel_tol=1e-9)
    assert bench.tokens_to_reach(scratch, 6.9) is None
    assert bench.multiple_label(scratch, 1000, 7.5) == f"{10**4.5 / 1000:.1f}x"
    assert bench.multiple_label(scratch, 2000, 6.5) == "> 50.0x"  # never reached: 100k / 2k
    assert bench.multiple_label(scratch, 2000, 9.5) == "<= 0.5x"  # scratch's first point is there


@pytest.mark.slow
def test_bench_runs_at_two_budgets_and_reruns_from_its_points(default_run, tmp_path):
    run_dir, _ = default_run
    cmd = [sys.executable, "bench/token_efficiency.py", "--work", str(tmp_path), "--base",
           str(run_dir), "--budgets", "1024", "2048", "--scratch-budgets", "--scratch-lrs",
           "1e-3", "--heldout-samples", "8"]  # fmt: skip
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    progress = [line for line in first.splitlines() if line.startswith("[")]
    assert len(progress) == 4, first  # kd and scratch at each budget, one line each
    results = json.loads((tmp_path / "results.json").read_text())
    points = {(p["variant"], p["tokens"]): p["heldout_loss"] for p in results["points"]}
    assert set(points) == {(v, t) for v in ("kd", "scratch") for t in (1024, 2048)}
    assert all(math.isfinite(loss) for loss in points.values())
    assert results["lines"]["teacher"] < results["lines"]["pruned, no training"]
    # distillation beats training from scratch at equal tokens (the default run's claim, moved
    # here: the shared default run trains no scratch baseline); one KD step from the pruned
    # model stays far below a random model's loss (~ln 49152)
    for tokens in (1024, 2048):
        assert points[("kd", tokens)] < points[("scratch", tokens)] < math.log(49152) + 0.5
    table = (tmp_path / "token_efficiency.md").read_text()
    assert "| 1,024 |" in table and "| 2,048 |" in table and "scratch tokens to match KD" in table
    assert (tmp_path / "token_efficiency.png").stat().st_size > 10_000
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "points").glob("*/result.json")}
    assert len(done) == 4
    done[tmp_path / "lines.json"] = (tmp_path / "lines.json").stat().st_mtime_ns
    subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    # none trained again, and the teacher's / pruned model's held-out losses were not recomputed
    assert {p: p.stat().st_mtime_ns for p in done} == done
    rerun = (tmp_path / "token_efficiency.md").read_text()
    assert rerun.split("bench wall")[0] == table.split("bench wall")[0]
