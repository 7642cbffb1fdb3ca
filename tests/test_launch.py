"""Recipes validate; launchers parse; the Dockerfile is pinned and installs the package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minitron_nemo.errors import MinitronError
from minitron_nemo.validate import validate_recipe
from tests.helpers import REPO

RECIPES = sorted((REPO / "minitron_nemo" / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_validates(recipe):
    validate_recipe(recipe)


def test_recipes_carry_a_launch_command():
    for recipe in RECIPES:
        if recipe.name != "base.yaml":
            header = recipe.read_text().split("\n\n")[0]
            assert re.search(r"^# Launch", header, re.M), recipe


def test_validate_catches_bad_recipes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"base: {REPO / 'recipes/smollm2_135m_cpu.yaml'}\nprune:\n  ffn_hidden_sise: 3\n"
    )
    with pytest.raises(MinitronError, match="ffn_hidden_sise"):
        validate_recipe(bad)
    bad.write_text(
        f"base: {REPO / 'recipes/llama31_8b_to_4b_width.yaml'}\nprune:\n  ffn_hidden_size: 9217\n"
    )
    with pytest.raises(MinitronError, match="tensor parallel size 8 does not divide"):
        validate_recipe(bad)
    result = subprocess.run(
        [sys.executable, "-m", "minitron_nemo.cli", "validate", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize(
    "script",
    ["launch/torchrun.sh", "launch/slurm.sbatch", "scripts/setup.sh", "scripts/test.sh", ".ci/run"],
)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_nemo_run_launcher_compiles():
    compile((REPO / "launch/nemo_run.py").read_text(), "nemo_run.py", "exec")


def test_dockerfile_is_pinned_and_installs_the_package():
    lines = [line.strip() for line in (REPO / "docker/Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    base = [line for line in instructions if line.startswith("FROM ")]
    assert len(base) == 1
    image = base[0].split()[1]
    assert re.fullmatch(r"nvcr\.io/nvidia/(nemo|pytorch):[0-9][\w.\-]+", image), image
    assert not image.endswith(":latest")
    text = "\n".join(instructions)
    assert "megatron-core==0.19.2" in text
    assert re.search(r"pip install [^\n]*-e \.", text)
    for path in ("minitron_nemo", "launch", "setup.py"):  # recipes are package data
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path
    assert '"recipes/*.yaml"' in (REPO / "setup.py").read_text()
    assert Path(REPO / "docker/README.md").is_file()


@pytest.mark.dist
def test_ranks_started_by_torchrun_launcher(tmp_path, monkeypatch):
    """MINITRON_LAUNCHER=torchrun (the multi-node path, here on one node) converts at TP=2 like
    the default spawned ranks do."""
    import torch
    from safetensors.torch import load_file

    from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
    from minitron_nemo.convert.mcore_to_hf import mcore_to_hf
    from tests.helpers import make_tiny_hf

    hf = make_tiny_hf("llama", tmp_path / "hf")
    monkeypatch.setenv("MINITRON_LAUNCHER", "torchrun")
    monkeypatch.setenv("MINITRON_JOB_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    hf_to_mcore(hf, tmp_path / "mc", tp=2)
    monkeypatch.delenv("MINITRON_LAUNCHER")
    mcore_to_hf(tmp_path / "mc", tmp_path / "out")
    before, after = (
        load_file(hf / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list((tmp_path / "jobs").iterdir())  # the job file is removed


def test_stages_in_one_process_leave_the_excepthook_as_they_found_it():
    """torch's init_process_group prefixes tracebacks with "[rankN]: " by wrapping
    sys.excepthook; a process running several stages must not stack the prefix."""
    from minitron_nemo.runtime import distributed

    hook = sys.excepthook
    for _ in range(2):
        with distributed.initialize():
            pass
    assert sys.excepthook is hook


def _initialize_twice(out: str) -> None:
    """Rank job: two process groups one after the other, each all-reducing rank + 1."""
    import json

    import torch
    import torch.distributed as dist

    from minitron_nemo.runtime import distributed

    sums = []
    for _ in range(2):
        with distributed.initialize(tp=1, pp=1) as ctx:
            value = torch.tensor([float(ctx.rank + 1)])
            dist.all_reduce(value)
            sums.append(value.item())
    if ctx.rank == 0:
        Path(out).write_text(json.dumps(sums))


@pytest.mark.dist
def test_spawned_ranks_meet_at_the_launchers_store_twice_in_one_job(tmp_path, monkeypatch):
    """Spawned ranks need no port chosen in advance (the launcher serves their store) and a job
    that starts a second process group after the first meets again (its own key prefix)."""
    import json

    from minitron_nemo.runtime.launch import run_on_ranks

    monkeypatch.delenv("MINITRON_LAUNCHER", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    run_on_ranks(_initialize_twice, 2, str(tmp_path / "sums.json"))
    assert json.loads((tmp_path / "sums.json").read_text()) == [3.0, 3.0]


def _report_launch(tag: str) -> None:
    import os

    print(f"rank {os.environ['RANK']} {tag} {os.environ.get('PROBE')} {os.getcwd()}", flush=True)
    print(f"rank {os.environ['RANK']} stderr", file=sys.stderr, flush=True)


@pytest.mark.dist
def test_forked_ranks_get_the_launchers_environment_directory_and_output(
    tmp_path, monkeypatch, capfd
):
    """Ranks forked from the forkserver (CPU) see this process's environment, working directory
    and stdout / stderr as they are at each launch, not as they were when the forkserver
    started (at the first launch of the process: here the first one below at the latest, with
    other values and other output files)."""
    from minitron_nemo.runtime import cpu_compat
    from minitron_nemo.runtime.launch import run_on_ranks

    monkeypatch.delenv("MINITRON_LAUNCHER", raising=False)
    first = tmp_path / "first.log"
    for i in range(2):
        monkeypatch.setenv("PROBE", f"value{i}")
        where = tmp_path / f"cwd{i}"
        where.mkdir()
        monkeypatch.chdir(where)
        if i == 0:  # stdout and stderr to a file of our own, not this test's capture
            saved = [os.dup(1), os.dup(2)]
            with open(first, "w") as fh:
                os.dup2(fh.fileno(), 1)
                os.dup2(fh.fileno(), 2)
            try:
                run_on_ranks(_report_launch, 2, "launch0")
            finally:
                for fd, target in zip(saved, (1, 2), strict=True):
                    os.dup2(fd, target)
                    os.close(fd)
            out = err = first.read_text()  # both went to the one file
        else:
            run_on_ranks(_report_launch, 2, "launch1")
            out, err = capfd.readouterr()
        lines = sorted(line for line in out.splitlines() if f" launch{i} " in line)
        assert lines == [f"rank {r} launch{i} value{i} {where}" for r in (0, 1)], out
        assert err.count("stderr") == 2, err
    assert cpu_compat.rank_start_method() == "forkserver"  # CPU: the path under test
