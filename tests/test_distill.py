"""The distillation loop: loss goes down, TP/PP/DP equal one process, exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitron_nemo.checkpoint import load_model
from minitron_nemo.config import DistillConfig
from minitron_nemo.distill.checkpoints import latest_checkpoint
from minitron_nemo.distill.train import resolve_cpu_compile, train
from minitron_nemo.errors import MinitronError
from minitron_nemo.metrics import read_metrics
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.runtime import distributed
from tests.helpers import (
    REPO,
    VOCAB,
    make_kd_models,
    random_documents,
    token_data_spec,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_kd_models(tmp_path_factory.mktemp("kd"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """~46 samples of 17 tokens per epoch (30 random documents of 25 tokens)."""
    root = tmp_path_factory.mktemp("kd_data")
    spec = token_data_spec(root, random_documents(30, 25), seq_length=16)
    (root / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
    return spec


def _cfg(**overrides) -> DistillConfig:
    base = dict(
        steps=4,
        global_batch_size=4,
        micro_batch_size=2,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=1,
        save_every=2,
        kd_chunk_tokens=7,
    )
    base.update(overrides)
    return DistillConfig(**base)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    with distributed.initialize(tp=1, pp=1):
        model, _ = load_model(ckpt)
        return {
            k: v.detach().clone() for k, v in model.state_dict().items() if "extra_state" not in k
        }


def _losses(out: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in read_metrics(out)]


def test_kd_loss_goes_down_and_logs(models, data, tmp_path):
    final = train(
        models / "student",
        tmp_path,
        _cfg(steps=16, warmup_steps=2, save_every=8),
        data,
        models / "teacher",
    )
    losses = _losses(tmp_path)
    assert len(losses) == 16
    assert losses[-1] < 0.7 * losses[0], losses
    metrics = read_metrics(tmp_path)
    assert all({"loss_logits", "lr", "grad_norm", "tokens_per_s"} <= set(m) for m in metrics)
    assert metrics[0]["lr"] == pytest.approx(1.5e-3)  # warmup: lr / 2 on the first of 2 steps
    assert list((tmp_path / "tensorboard").glob("events.*"))
    assert final.name == "step_000016" and (final / "arch.yaml").is_file()


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["tp2", "pp2", "dp2"])
def test_parallel_layouts_match_one_process(models, data, tmp_path, tp, pp, dp):
    cfg = _cfg(steps=3, save_every=3)
    train(models / "student", tmp_path / "ref", cfg, data, models / "teacher")
    train(models / "student", tmp_path / "par", cfg, data, models / "teacher", tp=tp, pp=pp, dp=dp)
    ref, par = _losses(tmp_path / "ref"), _losses(tmp_path / "par")
    assert par == pytest.approx(ref, rel=1e-5, abs=1e-7)
    w_ref = _weights(tmp_path / "ref" / "checkpoints" / "step_000003")
    w_par = _weights(tmp_path / "par" / "checkpoints" / "step_000003")
    for name, tensor in w_ref.items():
        # Adam divides by sqrt(v): where an element's gradient is near rounding noise, last-bit
        # gradient differences between layouts move its update by a visible fraction of lr
        # (3e-3): at TP 2 with one thread per process, one qkv element of 12,288 ends 1.03e-4
        # apart, the next largest 1e-5. A layout bug moves whole rows or tensors by O(lr). So:
        # 99.9% of each tensor within 1e-5, no element beyond a third of one step's update.
        err = (w_par[name] - tensor).abs().flatten()
        assert torch.quantile(err, 0.999).item() < 1e-5, (name, err.max().item())
        assert err.max().item() < 1e-3, (name, err.max().item())


@pytest.mark.dist
def test_intermediate_loss_on_both_pipeline_stages(models, data, tmp_path):
    """Pairs on stage 0 and stage 1 of PP=2 give the same losses as PP=1."""
    cfg = _cfg(steps=3, save_every=3, intermediate_pairs=[[0, 1], [1, 3]], lm_weight=0.5)
    train(models / "student", tmp_path / "pp1", cfg, data, models / "teacher")
    train(models / "student", tmp_path / "pp2", cfg, data, models / "teacher", pp=2)
    for key in ("loss", "loss_logits", "loss_intermediate", "loss_lm"):
        assert _losses(tmp_path / "pp2", key) == pytest.approx(
            _losses(tmp_path / "pp1", key), rel=1e-5
        )
    assert _losses(tmp_path / "pp1", "loss_intermediate")[0] > 0


def _spec(models: Path, data, out: Path, cfg: DistillConfig) -> dict:
    """What tests/scripts/run_train.py needs to run this training in a fresh process."""
    return {
        "student": str(models / "student"),
        "teacher": str(models / "teacher"),
        "out": str(out),
        "cfg": cfg.__dict__,
        "data": dataclasses.asdict(data),
    }


def _run_subprocess(spec: dict, path: Path, env: dict[str, str] | None = None) -> int:
    """Run a training in its own session; output goes to a file (a SIGKILLed trainer leaves
    dist-checkpoint helper processes that would keep a pipe open), stragglers are killed."""
    path.write_text(json.dumps(spec))
    with open(path.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests/scripts/run_train.py"), str(path)],
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


RESUME_CFG = dict(steps=6, save_every=2)
"""The runs that are killed and resumed, and the uninterrupted one they must equal."""


@pytest.fixture(scope="module")
def uninterrupted(models, data, tmp_path_factory):
    """An uninterrupted run of RESUME_CFG: (its losses, its final weights); shared read-only by
    the two resume tests."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train(models / "student", out, _cfg(**RESUME_CFG), data, models / "teacher")
    return _losses(out), _weights(out / "checkpoints" / "step_000006")


def test_resume_after_sigkill_is_bitwise_identical(models, data, uninterrupted, tmp_path):
    spec = _spec(models, data, tmp_path / "killed", _cfg(**RESUME_CFG))
    rc = _run_subprocess({**spec, "kill_after_step": 3}, tmp_path / "spec.json")
    assert rc != 0  # killed
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_000002"
    # the rerun, in this process (resuming is the same call; one interpreter start less)
    train(models / "student", tmp_path / "killed", _cfg(**RESUME_CFG), data, models / "teacher")
    losses_full, w_full = uninterrupted
    assert _losses(tmp_path / "killed") == losses_full
    w_res = _weights(tmp_path / "killed" / "checkpoints" / "step_000006")
    assert all(torch.equal(w_res[k], w_full[k]) for k in w_full)


def test_half_written_checkpoint_is_never_picked_up(models, data, uninterrupted, tmp_path):
    spec = _spec(models, data, tmp_path / "run", _cfg(**RESUME_CFG))
    rc = _run_subprocess({**spec, "kill_during_save": 4}, tmp_path / "spec.json")
    assert rc != 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / ".step_000004.incomplete").is_dir()  # the half-written one is there...
    assert latest_checkpoint(ckpts).name == "step_000002"  # ...and ignored
    train(models / "student", tmp_path / "run", _cfg(**RESUME_CFG), data, models / "teacher")
    losses_full, w_full = uninterrupted
    assert _losses(tmp_path / "run") == losses_full
    w_res = _weights(ckpts / "step_000006")
    assert all(torch.equal(w_res[k], w_full[k]) for k in w_full)


def test_cpu_compile_trains_like_eager_without_graph_breaks(models, data, tmp_path):
    """distill.cpu_compile (layers and KD loss through torch.compile, runtime/cpu_compat.py)
    trains like the eager loop: the same losses and weights up to the rounding of fused
    kernels, through chunked KD with temperature, LM loss and an intermediate-loss pair (its
    forward hooks on compiled layers). No graph break: one would split every layer at its
    linear layers and lose most of the gain (megatron's deprecation warnings did)."""
    from torch._dynamo.utils import counters

    cfg = _cfg(steps=3, save_every=3, temperature=2.0, lm_weight=0.5,
               intermediate_pairs=[[1, 3]])  # fmt: skip
    train(models / "student", tmp_path / "eager", cfg, data, models / "teacher")
    counters.clear()
    cfg = dataclasses.replace(cfg, cpu_compile="on")
    train(models / "student", tmp_path / "compiled", cfg, data, models / "teacher")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] > 0  # it did compile
    for key in ("loss", "loss_logits", "loss_lm"):
        eager, compiled = _losses(tmp_path / "eager", key), _losses(tmp_path / "compiled", key)
        assert compiled == pytest.approx(eager, rel=1e-5), key
    w_eager = _weights(tmp_path / "eager" / "checkpoints" / "step_000003")
    w_compiled = _weights(tmp_path / "compiled" / "checkpoints" / "step_000003")
    for name, tensor in w_eager.items():
        err = (w_compiled[name] - tensor).abs().max().item()
        assert err < 1e-4, (name, err)  # as test_parallel_layouts_match_one_process


def test_cpu_compile_auto_trains_eagerly_where_on_refuses(models, monkeypatch):
    """cpu_compile "auto" compiles exactly where "on" would, and trains eagerly where "on"
    refuses (a model-parallel layout, recompute, no C++ compiler); "off" never compiles."""
    student = ModelArch.load(models / "student" / "arch.yaml")
    teacher = models / "teacher"

    def resolve(mode, tp=1, **cfg):
        return resolve_cpu_compile(_cfg(cpu_compile=mode, **cfg), student, teacher, tp, 1, 1)

    assert resolve("auto") and resolve("on") and not resolve("off")
    assert not resolve("auto", tp=2) and not resolve("auto", recompute="selective")
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "no-such-compiler++"))
    assert not resolve("auto")
    with pytest.raises(MinitronError, match=r"cpu_compile needs a C\+\+ compiler"):
        resolve("on")


def test_lm_mode_trains_without_teacher(models, tmp_path):
    """LM loss only (scratch baseline / teacher correction) learns a predictable sequence; a
    warmup as long as the run (teacher correction's default: 120 > 20 steps) is clamped."""
    counting = token_data_spec(tmp_path / "data", [[i % VOCAB for i in range(700)]], seq_length=16)
    cfg = _cfg(mode="lm", steps=8, save_every=8, warmup_steps=8)
    train(models / "student", tmp_path, cfg, counting)
    losses = _losses(tmp_path, "loss_lm")
    assert losses[-1] < losses[0]


def test_refusals(models, data, tmp_path):
    with pytest.raises(MinitronError, match=r"fp8 = 'hybrid' needs TransformerEngine"):
        train(models / "student", tmp_path / "a", _cfg(fp8="hybrid"), data, models / "teacher")
    with pytest.raises(MinitronError, match="teacher checkpoint is required"):
        train(models / "student", tmp_path / "b", _cfg(), data, None)
    with pytest.raises(
        MinitronError, match=r"student layer 0 on pipeline stage 0 and teacher layer 3"
    ):
        train(
            models / "student",
            tmp_path / "d",
            _cfg(intermediate_pairs=[[0, 3]]),
            data,
            models / "teacher",
            pp=2,
        )
    with pytest.raises(MinitronError, match=r"\[5, 1\] is out of range"):
        train(
            models / "student",
            tmp_path / "e",
            _cfg(intermediate_pairs=[[5, 1]]),
            data,
            models / "teacher",
        )
    with pytest.raises(MinitronError, match=r"cpu_compile needs parallel\.tp, pp and ep of 1"):
        compiled = _cfg(cpu_compile="on")
        train(models / "student", tmp_path / "f", compiled, data, models / "teacher", tp=2)
    with pytest.raises(MinitronError, match=r"cpu_compile compiles whole layers"):
        _cfg(cpu_compile="on", recompute="full")
    with pytest.raises(MinitronError, match=r"distill\.kl: expected"):
        train(models / "student", tmp_path / "c", _cfg(kl="js"), data, models / "teacher")
