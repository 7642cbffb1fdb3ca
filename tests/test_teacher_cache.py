"""The teacher top-K cache: distilling from it equals online top-K distillation step by step
(TP=1 and TP=2), a killed build resumes without redoing written rows, and a cache that does
not fit the training is refused with one line."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from minitron_nemo import atomic
from minitron_nemo.config import DistillConfig
from minitron_nemo.distill.teacher_cache import CacheMeta, TeacherCache, build_teacher_cache
from minitron_nemo.distill.train import train
from minitron_nemo.errors import MinitronError
from minitron_nemo.metrics import read_metrics
from tests.helpers import make_kd_models, random_documents, token_data_spec

K = 5
STEPS, GBS, MB, CHUNK = 3, 4, 2, 7


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_kd_models(tmp_path_factory.mktemp("cache_models"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_data")
    spec = token_data_spec(root, random_documents(30, 25), seq_length=16)
    return dataclasses.replace(spec, train_samples=STEPS * GBS)


def _cfg(**overrides) -> DistillConfig:
    base = dict(
        steps=STEPS, global_batch_size=GBS, micro_batch_size=MB, lr=3e-3, min_lr=3e-4,
        warmup_steps=1, save_every=STEPS, kd_chunk_tokens=CHUNK, kl="topk", top_k=K,
        temperature=1.5, lm_weight=0.3,
    )  # fmt: skip
    base.update(overrides)
    return DistillConfig(**base)


def _cache(models, data, out, tp=1, dtype="float32", **kw):
    return build_teacher_cache(
        models / "teacher", data, out, K, 1.5, dtype, tp=tp, micro_batch=MB,
        round_samples=GBS, chunk_tokens=CHUNK, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    "tp", [1, pytest.param(2, marks=pytest.mark.dist)], ids=["tp1", "tp2"]
)  # fmt: skip
def test_cache_distillation_equals_online_top_k(models, data, tmp_path, tp):
    cache = _cache(models, data, tmp_path / "cache", tp=tp)
    train(models / "student", tmp_path / "online", _cfg(), data, models / "teacher", tp=tp)
    train(models / "student", tmp_path / "cached", _cfg(teacher_cache=str(cache)), data, tp=tp)
    online, cached = read_metrics(tmp_path / "online"), read_metrics(tmp_path / "cached")
    assert len(online) == len(cached) == STEPS
    for a, b in zip(online, cached, strict=True):
        for key in ("loss", "loss_logits", "loss_lm"):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a[key], b[key])
    if tp > 1:
        return
    # The same cache in bf16: 2 bytes per value, the loss within 1%.
    bf16 = _cache(models, data, tmp_path / "cache_bf16", tp=tp, dtype="bfloat16")
    sizes = {p.name: p.stat().st_size for p in bf16.glob("*.bin")}
    assert sizes["logp.bin"] == STEPS * GBS * 16 * K * 2
    train(models / "student", tmp_path / "bf16", _cfg(teacher_cache=str(bf16)), data, tp=tp)
    for a, b in zip(online, read_metrics(tmp_path / "bf16"), strict=True):
        assert abs(a["loss_logits"] - b["loss_logits"]) <= 1e-2 * a["loss_logits"]


@pytest.mark.dist
def test_build_on_two_pipeline_stages_equals_one_rank(models, data, tmp_path):
    samples = list(range(STEPS * GBS))
    one = TeacherCache(_cache(models, data, tmp_path / "one"))
    two = TeacherCache(_cache(models, data, tmp_path / "pp2", pp=2))
    assert torch.equal(two.tokens(samples), one.tokens(samples))
    a, b = one.read(samples), two.read(samples)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(b.logp, a.logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.log_tail, a.log_tail, rtol=1e-6, atol=1e-6)


def test_killed_build_resumes_without_redoing_rows(models, data, tmp_path):
    full = _cache(models, data, tmp_path / "full")
    # A build killed after its first round: rows 0..3 written (here: marked), progress 4.
    out = tmp_path / "resumed"
    tmp = atomic.incomplete_path(out)
    shutil.copytree(full, tmp)
    (tmp / atomic.DONE).unlink()
    (tmp / "progress.json").write_text(json.dumps({"samples": GBS}))
    meta = CacheMeta.read(full)
    logp = np.memmap(tmp / "logp.bin", dtype=np.float32, mode="r+", shape=(STEPS * GBS, 16, K))
    logp[:GBS] = 7.0  # a row the resumed build must not touch
    logp[GBS:] = 0.0  # rows it must compute
    logp.flush()
    _cache(models, data, out)
    assert atomic.is_complete(out) and not tmp.exists()
    done, ref = (
        TeacherCache(out).read(list(range(STEPS * GBS))),
        TeacherCache(full).read(list(range(STEPS * GBS))),
    )
    assert torch.all(done.logp[:GBS] == 7.0)
    assert torch.equal(done.logp[GBS:], ref.logp[GBS:])
    assert torch.equal(done.ids, ref.ids) and meta == CacheMeta.read(out)


def test_mismatched_cache_is_refused(models, data, tmp_path):
    cache = _cache(models, data, tmp_path / "cache")

    def distill(out, data=data, student=models / "student", **overrides):
        cfg = _cfg(teacher_cache=str(cache), **overrides)
        train(student, tmp_path / out, cfg, data)

    with pytest.raises(MinitronError, match=r"meta.json: built with top_k 5, distill.top_k is 4"):
        distill("k", top_k=4)
    with pytest.raises(MinitronError, match=r"built at temperature 1.5, distill.temperature"):
        distill("t", temperature=1.0)
    with pytest.raises(MinitronError, match=r"holds 12 samples, the training reads 16"):
        distill("n", steps=4)
    with pytest.raises(MinitronError, match=r"built for other data \(data seed: 0 vs 1\)"):
        distill("seed", data=dataclasses.replace(data, seed=1))
    other_tok = tmp_path / "student_other_tokenizer"
    shutil.copytree(models / "student", other_tok)
    (other_tok / "tokenizer").mkdir(exist_ok=True)
    (other_tok / "tokenizer" / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []})
    )
    with pytest.raises(MinitronError, match=r"tokenizer differs from the student's"):
        distill("tok", student=other_tok)
    with pytest.raises(MinitronError, match=r"needs mode distill, kl topk"):
        _cfg(teacher_cache=str(cache), kl="forward")
    # Data changed under the cache: a sample of a later step is not the cached one.
    tokens = np.memmap(cache / "tokens.bin", dtype=np.uint16, mode="r+", shape=(12, 17))
    tokens[GBS + 1, 3] = (int(tokens[GBS + 1, 3]) + 1) % 64
    tokens.flush()
    with pytest.raises(MinitronError, match=r"sample 5 of the training data differs"):
        distill("tokens")


def test_build_refuses_a_disk_too_small(models, data, tmp_path, monkeypatch):
    from minitron_nemo.runtime import diskspace

    monkeypatch.setattr(diskspace, "free_bytes", lambda _path: 100)
    with pytest.raises(MinitronError, match=r"not enough disk space \(0.00 GB free"):
        _cache(models, data, tmp_path / "cache")
