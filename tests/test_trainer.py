"""The trainer for long runs: preemption -> save -> exit 0 -> bitwise resume; checkpoint
retention; the non-finite guard; disk full; metrics every log_every steps; recompute; Adam's
state made before the first step."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minitron_nemo.config import DistillConfig
from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from minitron_nemo.distill.checkpoints import complete_steps, kept_steps, latest_checkpoint
from minitron_nemo.distill.train import train
from minitron_nemo.distill.trainer import TrainHooks
from minitron_nemo.errors import MinitronError
from minitron_nemo.metrics import read_metrics
from minitron_nemo.runtime import cpu_compat
from tests.fault_hooks import nan_at
from tests.helpers import REPO, make_tiny_hf, random_documents, token_data_spec
from tests.test_distill import _weights


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    make_tiny_hf("llama", root / "teacher_hf", seed=1)
    hf_to_mcore(root / "teacher_hf", root / "teacher")
    make_tiny_hf("llama", root / "student_hf", seed=2, intermediate_size=64, num_hidden_layers=2)
    hf_to_mcore(root / "student_hf", root / "student")
    data = token_data_spec(root / "data", random_documents(30, 25), seq_length=16)
    return root, data


def _cfg(**overrides) -> DistillConfig:
    base = dict(
        steps=6, global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
        warmup_steps=1, save_every=2, kd_chunk_tokens=7,
    )  # fmt: skip
    base.update(overrides)
    return DistillConfig(**base)


def _train(setup, out: Path, cfg: DistillConfig, **kwargs) -> Path:
    root, data = setup
    return train(root / "student", out, cfg, data, root / "teacher", **kwargs)


def test_sigterm_saves_exits_zero_and_resumes_bitwise(setup, tmp_path):
    """SIGTERM to the launching process mid-run (DP = 2: forwarded to both ranks, which agree
    on the step): it saves, exits 0 with one line; rerunning resumes to the same weights."""
    root, data = setup
    cfg = _cfg(steps=24, save_every=100)
    _train(setup, tmp_path / "full", cfg, dp=2)
    spec = {
        "student": str(root / "student"),
        "teacher": str(root / "teacher"),
        "out": str(tmp_path / "run"),
        "cfg": dataclasses.asdict(cfg),
        "data": dataclasses.asdict(data),
        "dp": 2,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(REPO / "tests/scripts/run_train.py"), str(tmp_path / "spec.json")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.is_file() and len(read_metrics(metrics.parent)) >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    stopped = latest_checkpoint(tmp_path / "run" / "checkpoints")
    step = int(stopped.name.split("_")[1])
    assert 3 <= step < 24, output
    assert f"stopped at step {step}; rerun the same command to resume" in output
    _train(setup, tmp_path / "run", cfg, dp=2)  # the rerun (in this process: one launch less)
    full = read_metrics(tmp_path / "full")
    resumed = read_metrics(tmp_path / "run")
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    w_full = _weights(tmp_path / "full" / "checkpoints" / "step_000024")
    w_res = _weights(tmp_path / "run" / "checkpoints" / "step_000024")
    assert all(torch.equal(w_res[k], w_full[k]) for k in w_full)


def test_retention_keeps_the_last_k_and_every_mth():
    assert kept_steps([1, 2, 3, 4, 5, 6], keep_last=2, keep_every=None) == {5, 6}
    assert kept_steps([1, 2, 3, 4, 5, 6], keep_last=2, keep_every=4) == {4, 5, 6}
    assert kept_steps([3], keep_last=1, keep_every=None) == {3}  # the newest always stays


def test_retention_in_a_run(setup, tmp_path):
    _train(setup, tmp_path, _cfg(steps=7, save_every=1, keep_last=2, keep_every=3))
    steps = [s for s, _ in complete_steps(tmp_path / "checkpoints")]
    assert steps == [3, 6, 7]
    assert not list((tmp_path / "checkpoints").glob(".*incomplete"))


def test_a_nan_step_is_skipped_and_logged(setup, tmp_path):
    hooks = TrainHooks(poison_grads=lambda step: nan_at((3,), step))
    final = _train(setup, tmp_path, _cfg(), hooks=hooks)
    metrics = read_metrics(tmp_path)
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1, 1]
    assert metrics[2]["grad_norm"] != metrics[2]["grad_norm"]  # NaN: no update that step
    # The skipped step did not touch the weights, the optimizer or the LR schedule: the next
    # step trains at the LR the skipped one would have used.
    assert metrics[3]["lr"] == metrics[2]["lr"]
    weights = _weights(final)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_repeated_nans_stop_cleanly_and_keep_the_last_good_checkpoint(setup, tmp_path):
    hooks = TrainHooks(poison_grads=lambda step: nan_at((3, 4, 5), step))
    with pytest.raises(MinitronError) as err:
        _train(setup, tmp_path, _cfg(max_nonfinite_steps=3), hooks=hooks)
    message = str(err.value)
    assert "3 steps in a row with a non-finite loss or gradient (steps 3-5, skipped)" in message
    # Step 4's save holds the weights of step 2 (skipped steps change nothing) and resumes past
    # the bad batches; the run stopped at step 5 without saving.
    assert "stopped at step 5" in message and "step_000004" in message
    assert [s for s, _ in complete_steps(tmp_path / "checkpoints")] == [2, 4]
    w2, w4 = (_weights(tmp_path / f"checkpoints/step_00000{i}") for i in (2, 4))
    assert all(torch.equal(w2[k], w4[k]) and torch.isfinite(w4[k]).all() for k in w2)


def test_save_into_a_full_disk_is_one_line_and_keeps_earlier_checkpoints(
    setup, tmp_path, monkeypatch
):
    from megatron.core import dist_checkpointing

    from minitron_nemo.runtime import diskspace

    real_save = dist_checkpointing.save
    calls = {"n": 0}

    def save_then_fill_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save runs out of space half way
            monkeypatch.setattr(diskspace, "free_bytes", lambda path: 0)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", save_then_fill_disk)
    with pytest.raises(
        MinitronError,
        match=r"checkpoints: not enough disk space \(0\.00 GB free, about 0\.\d+ GB needed\)",
    ):
        _train(setup, tmp_path, _cfg())
    assert [s for s, _ in complete_steps(tmp_path / "checkpoints")] == [2]  # intact
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_000002"


def test_conversion_refuses_a_disk_too_small(tmp_path, monkeypatch):
    from minitron_nemo.runtime import diskspace

    hf = make_tiny_hf("llama", tmp_path / "hf")
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 1000)
    with pytest.raises(MinitronError, match=r"not enough disk space \(0\.00 GB free, about"):
        hf_to_mcore(hf, tmp_path / "mc")
    assert not (tmp_path / "mc").exists() and not list(tmp_path.glob(".mc*"))


def test_metrics_every_log_every_steps(setup, tmp_path):
    _train(setup, tmp_path, _cfg(steps=7, log_every=3, lm_weight=0.5))
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [3, 6, 7]
    keys = {"loss", "loss_logits", "loss_lm", "lr", "grad_norm", "tokens_per_s", "mfu",
            "peak_memory_gib", "step_time_s", "data_time_s", "skipped_steps"}  # fmt: skip
    assert all(keys <= set(m) for m in metrics), metrics[0].keys()
    first = metrics[0]
    assert first["loss"] == pytest.approx(first["loss_logits"] + 0.5 * first["loss_lm"], rel=1e-6)
    assert 0 < first["mfu"] < 1 and first["tokens_per_s"] > 0


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_gives_the_same_training(setup, tmp_path, recompute):
    _train(setup, tmp_path / "plain", _cfg(steps=3, save_every=3))
    _train(setup, tmp_path / "re", _cfg(steps=3, save_every=3, recompute=recompute))
    assert [m["loss"] for m in read_metrics(tmp_path / "re")] == [
        m["loss"] for m in read_metrics(tmp_path / "plain")
    ]


def test_gpu_only_options_are_refused_on_this_machine(setup, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(MinitronError, match="async_save needs a GPU and nvidia-resiliency-ext"):
        _train(setup, tmp_path, _cfg(async_save=True))
    with pytest.raises(MinitronError, match="transformer_engine = on: TransformerEngine is not"):
        _train(setup, tmp_path, _cfg(transformer_engine="on"))


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU helper (no-op with CUDA)")


@CPU_ONLY
def test_checkpoint_saves_on_cpu_start_no_helper_process(setup, tmp_path):
    """A dist-checkpoint save on CPU hands its write results through an in-process queue, not
    megatron's spawned Manager process (~6 s in every process that saves); the save loads."""
    import multiprocessing
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    final = _train(setup, tmp_path, _cfg(steps=2, save_every=1))  # saves in this process
    assert isinstance(filesystem_async.get_write_results_queue(), queue.Queue)
    assert multiprocessing.active_children() == []
    assert _weights(final)


@CPU_ONLY
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_optimizer_state_made_early_equals_torchs_lazy_state(cls, fused, amsgrad):
    """cpu_compat.allocate_optimizer_state makes the state torch makes in the first step: the
    same keys, dtypes, devices, shapes and values, then the same updates."""

    def params():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]

    early, lazy = params(), params()
    kwargs = dict(lr=1e-2, weight_decay=0.1, fused=fused, amsgrad=amsgrad)
    opts = [cls(ps, **kwargs) for ps in (early, lazy)]
    cpu_compat.allocate_optimizer_state(opts[0])
    assert all(set(opts[0].state[p]) >= {"step", "exp_avg", "exp_avg_sq"} for p in early)
    assert not opts[1].state
    for step in range(2):
        torch.manual_seed(10 + step)
        grads = [torch.randn_like(p) for p in early]
        for ps, opt in zip((early, lazy), opts, strict=True):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(early, lazy, strict=True):
        assert torch.equal(a, b)
        state_a, state_b = opts[0].state[a], opts[1].state[b]
        assert set(state_a) == set(state_b)
        for key in state_a:
            x, y = state_a[key], state_b[key]
            assert (x.dtype, x.device, x.shape) == (y.dtype, y.device, y.shape), key
            assert torch.equal(x, y), key


@CPU_ONLY
def test_training_with_the_optimizer_state_made_early_is_bitwise_the_lazy_one(
    setup, tmp_path, monkeypatch
):
    """The trainer makes Adam's state before the first step (a CPU speed fix: no fresh heap
    pages in the second step) for every parameter of megatron's optimizer; losses and trained
    weights are bitwise those of torch's lazy state."""
    made = []
    allocate = cpu_compat.allocate_optimizer_state

    def allocate_and_check(optimizer):
        allocate(optimizer)
        for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
            adam = wrapper.optimizer
            made.extend(
                {"step", "exp_avg", "exp_avg_sq"} <= set(adam.state[p])
                for group in adam.param_groups
                for p in group["params"]
            )

    cfg = _cfg(steps=3, save_every=3)
    monkeypatch.setattr(cpu_compat, "allocate_optimizer_state", allocate_and_check)
    early = _train(setup, tmp_path / "early", cfg)
    assert made and all(made)
    monkeypatch.setattr(cpu_compat, "allocate_optimizer_state", lambda optimizer: None)
    lazy = _train(setup, tmp_path / "lazy", cfg)
    assert [m["loss"] for m in read_metrics(tmp_path / "early")] == [
        m["loss"] for m in read_metrics(tmp_path / "lazy")
    ]
    early_w, lazy_w = _weights(early), _weights(lazy)
    assert early_w.keys() == lazy_w.keys()
    assert all(torch.equal(early_w[k], lazy_w[k]) for k in early_w)
