"""GPU checks of training (run by `bash bench/gpu_check.sh` where a GPU is lent): a few bf16
distillation steps with the distributed optimizer and the TE spec when it imports, resumed from
a checkpoint; FP8 student steps when TransformerEngine imports."""

from __future__ import annotations

import importlib.util
import math

import pytest

from minitron_nemo.config import DistillConfig
from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from minitron_nemo.distill.train import train
from minitron_nemo.metrics import read_metrics
from tests.helpers import make_tiny_hf, random_documents, token_data_spec

pytestmark = pytest.mark.gpu
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_kd")
    make_tiny_hf("llama", root / "teacher_hf", seed=1)
    hf_to_mcore(root / "teacher_hf", root / "teacher", dtype="bf16")
    make_tiny_hf("llama", root / "student_hf", seed=2, intermediate_size=64, num_hidden_layers=2)
    hf_to_mcore(root / "student_hf", root / "student", dtype="bf16")
    data = token_data_spec(root / "data", random_documents(60, 33), seq_length=32)
    return root, data


def _cfg(**kw) -> DistillConfig:
    base = dict(steps=4, global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                warmup_steps=1, save_every=2, kd_chunk_tokens=64)  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


def test_bf16_steps_with_distributed_optimizer_and_resume(models, tmp_path):
    root, data = models
    train(root / "student", tmp_path, _cfg(), data, root / "teacher")
    first = read_metrics(tmp_path)
    assert len(first) == 4 and all(math.isfinite(m["loss"]) for m in first)
    train(root / "student", tmp_path, _cfg(steps=6), data, root / "teacher")  # resumes at 4
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    print("bf16 distill losses:", [round(m["loss"], 4) for m in metrics],
          "MFU", metrics[-1].get("mfu"), "GiB", metrics[-1]["peak_memory_gib"])  # fmt: skip


def test_moe_bf16_steps_with_router_loss(tmp_path):
    """A Qwen3-MoE student (TEGroupedMLP experts when TE imports, alltoall dispatcher) distilled
    from a Qwen3-MoE teacher in bf16: finite losses and a logged router load-balancing loss."""
    make_tiny_hf("qwen3_moe_nonorm", tmp_path / "teacher_hf", seed=1)
    hf_to_mcore(tmp_path / "teacher_hf", tmp_path / "teacher", dtype="bf16")
    make_tiny_hf("qwen3_moe", tmp_path / "student_hf", seed=2, num_hidden_layers=2)
    hf_to_mcore(tmp_path / "student_hf", tmp_path / "student", dtype="bf16")
    data = token_data_spec(tmp_path / "data", random_documents(60, 33), seq_length=32)
    train(tmp_path / "student", tmp_path / "run", _cfg(), data, tmp_path / "teacher")
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 4 and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["loss_moe_aux"] > 0 for m in metrics)
    print("moe bf16 distill losses:", [round(m["loss"], 4) for m in metrics],
          "router loss", [round(m["loss_moe_aux"], 4) for m in metrics])  # fmt: skip


@pytest.mark.skipif(not HAVE_TE, reason="TransformerEngine not installed")
def test_fp8_student_steps(models, tmp_path):
    root, data = models
    train(root / "student", tmp_path, _cfg(fp8="hybrid", save_every=4), data, root / "teacher")
    metrics = read_metrics(tmp_path)
    assert all(math.isfinite(m["loss"]) for m in metrics)
    print("fp8 distill losses:", [round(m["loss"], 4) for m in metrics])
