"""The command line without running stages: bad values refused at load with their choices,
packaged recipes (also from an installed wheel), light imports, no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minitron_nemo.config import DistillConfig, load_config
from minitron_nemo.errors import MinitronError
from tests.helpers import REPO


@pytest.mark.parametrize(
    "override,message",
    [
        ("distill.kl=forwrd", "distill.kl: expected forward, reverse or topk, got 'forwrd'"),
        ("distill.mode=kd", "distill.mode: expected distill, lm or teacher_correction, got 'kd'"),
        ("prune.depth_method=blocks", "prune.depth_method: expected block, per_layer or"),
        ("prune.aggregation_seq=max", "prune.aggregation_seq: expected mean, l2 or var, got"),
        ("distill.fp8=fp4", "distill.fp8: expected hybrid or e4m3, got 'fp4'"),
        ("dtype=fp16", "dtype: expected fp32, bf16 or auto, got 'fp16'"),
        ("prune.search_axes=[width]", r"prune\.search_axes\[0\]: expected hidden_size, ffn_hidden"),
        ("distill.global_batch_size=6", r"global_batch_size 6 is not a multiple of distill.micro"),
        ("parallel.tp=2", r"parallel\.tp = 2|tensor parallel size 2 does not divide"),
        ("prune.depth_eval_samples=64", r"depth_eval_samples \(64\) must be smaller"),
    ],
)
def test_bad_values_fail_at_load_with_the_allowed_values(override, message):
    with pytest.raises(MinitronError, match=message):
        load_config(REPO / "recipes/smollm2_135m_cpu.yaml", [override])


def test_on_and_off_are_words_for_choices_and_booleans_for_flags(tmp_path):
    """YAML 1.1 reads on / off / yes / no as booleans; for an auto / on / off field that made
    `transformer_engine: off` an error. In recipes and overrides they stay words, and bool
    fields still take them."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"base: {REPO / 'recipes/smollm2_135m_cpu.yaml'}\nscratch: off\n"
        "distill:\n  transformer_engine: off\n"
    )
    cfg = load_config(recipe, ["distill.cpu_compile=on", "eval.benchmark_pruned=no"])
    assert (cfg.distill.transformer_engine, cfg.distill.cpu_compile) == ("off", "on")
    assert cfg.scratch is False and cfg.eval.benchmark_pruned is False
    cfg = load_config(recipe, ["distill.cpu_compile=off", "scratch=yes"])
    assert cfg.distill.cpu_compile == "off" and cfg.scratch is True


def test_configs_built_in_python_are_checked_too():
    with pytest.raises(MinitronError, match="distill.kl: expected forward, reverse or topk"):
        DistillConfig(kl="js")
    with pytest.raises(MinitronError, match="every loss weight is 0"):
        DistillConfig(logits_weight=0.0)


def test_a_typo_fails_before_any_stage_runs(tmp_path):
    """`minitron prune ... distill.kl=forwrd` stops at load: no run directory is made."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "minitron_nemo.cli",
            "prune",
            "--config",
            str(REPO / "recipes/smollm2_135m_cpu.yaml"),
            f"run_dir={tmp_path / 'run'}",
            "distill.kl=forwrd",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "distill.kl: expected forward, reverse or topk, got 'forwrd'" in result.stderr
    assert not (tmp_path / "run").exists()


def _run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minitron_nemo.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_recipes_command_lists_packaged_recipes_with_their_purpose():
    result = _run_cli("recipes")
    assert result.returncode == 0, result.stderr
    assert "* smollm2_135m_cpu" in result.stdout and "llama31_8b_to_4b_width" in result.stdout
    assert "Llama-3.1-8B -> Llama-3.1-Minitron-4B-Width" in result.stdout


def test_validate_takes_overrides_and_recipe_names():
    ok = _run_cli("validate", "smollm2_135m_gpu", "distill.steps=3")
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stderr
    bad = _run_cli("validate", "smollm2_135m_gpu", "distill.kl=forwrd")
    assert bad.returncode == 1 and "distill.kl: expected" in bad.stderr


def test_validate_is_fast_and_imports_nothing_heavy():
    """The validate path imports neither torch, megatron, transformers nor matplotlib."""
    code = (
        "import sys, time; t = time.time()\n"
        "from minitron_nemo.cli import main\n"
        "assert main(['validate']) == 0\n"
        "heavy = [m for m in ('torch', 'megatron', 'transformers', 'matplotlib') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy, 'SECONDS', time.time() - t)\n"
    )
    start = time.time()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    wall = time.time() - start
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout
    # Measured ~0.6 s on 2 cores (README: under 1.5 s); a loaded CI box gets a wide margin.
    assert wall < 6, wall


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """minitron_nemo modules imported anywhere in the file (inside functions too: a lazy import
    hides a cycle from the import system, not from the design)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("minitron_nemo"):
                found.add(node.module)
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    if (package_root.parent / (candidate.replace(".", "/") + ".py")).is_file():
                        found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minitron_nemo")}
    return found


def _module_graph() -> dict[str, set[str]]:
    root = REPO / "minitron_nemo"
    graph = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = _module_imports(path, root) - {name}  # a package importing its modules
    return graph


def test_no_import_cycles():
    graph = _module_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep in graph and dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_reporting_does_not_import_training_or_megatron():
    code = (
        "import sys\n"
        "import minitron_nemo.report.run_report, minitron_nemo.report.plots\n"
        "import minitron_nemo.status\n"
        "bad = [m for m in sys.modules if m.startswith('megatron') or "
        "m == 'minitron_nemo.distill.train']\n"
        "print('BAD', bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "BAD []" in result.stdout, result.stdout


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_validates_its_packaged_default(tmp_path):
    """A wheel built from the tree, installed into a new venv, finds its own default recipe
    (run from a directory outside the source tree)."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(REPO)],
        check=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("minitron_nemo-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         str(wheel)],
        check=True,
    )  # fmt: skip
    # The dependencies (omegaconf, yaml, ...) come from this environment, after the venv's
    # own site-packages, so minitron_nemo itself is the wheel's copy.
    site = next((venv / "lib").glob("python3*/site-packages"))
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and "venv" in p)
    (site / "zz_deps.pth").write_text(str(ours) + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import minitron_nemo; print(minitron_nemo.__file__)"],
        capture_output=True, text=True, cwd=outside, check=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(venv)), where.stdout
    result = subprocess.run(
        [str(venv / "bin" / "minitron"), "validate"], capture_output=True, text=True, cwd=outside
    )
    assert result.returncode == 0, result.stderr
    assert "smollm2_135m_cpu.yaml" in result.stdout and str(venv) in result.stdout
