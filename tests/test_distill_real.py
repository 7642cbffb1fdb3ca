"""SmolLM2-135M pruned in width, a few minutes of distillation on real text: the held-out LM
loss goes down, and distillation beats the same steps with the LM loss only.

Measured at this budget (32 steps x 8 x 128 tokens, held-out from the same news corpus):
LM only 4.68, KD only 4.80, KD + LM (P1's CLM+KLD) 4.59. With ~30k tokens the plain LM loss
adapts to the corpus faster than logits-only KD, so the test distills with KD + LM: what it
proves is that the teacher's signal on top of the LM loss beats the LM loss alone."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_distillation_recovers_and_beats_lm_only(tmp_path):
    from minitron_nemo.config import DataConfig, DistillConfig, PruneConfig
    from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
    from minitron_nemo.convert.mcore_to_hf import mcore_to_hf
    from minitron_nemo.data.datasets import heldout_indices, heldout_reader
    from minitron_nemo.data.sources import smollm2_hf_dir
    from minitron_nemo.data.stage import prepare_data
    from minitron_nemo.distill.train import train
    from minitron_nemo.eval.lm import heldout_loss, load_hf_model
    from minitron_nemo.metrics import read_metrics
    from minitron_nemo.prune.quality import LEE_SPLIT
    from minitron_nemo.prune.stage import run_prune

    hf_dir = smollm2_hf_dir()
    data_cfg = DataConfig(
        source="gensim:lee_background",
        split=LEE_SPLIT,
        seq_length=128,
        heldout_samples=16,
        calibration_samples=20,
    )
    data = prepare_data(data_cfg, hf_dir, tmp_path / "data", 49152)
    heldout = heldout_reader(data).read(heldout_indices(data))
    hf_to_mcore(hf_dir, tmp_path / "teacher")
    run_prune(
        tmp_path / "teacher",
        tmp_path / "prune",
        PruneConfig(
            hidden_size=432,
            ffn_hidden_size=768,
            depth_scores=False,
            depth_eval_samples=4,
            micro_batch_size=4,
        ),
        data,
    )
    cfg = dict(
        steps=32,
        global_batch_size=8,
        micro_batch_size=8,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=2,
        save_every=32,
        kd_chunk_tokens=512,
    )
    kd = train(
        tmp_path / "prune" / "ckpt",
        tmp_path / "kd",
        DistillConfig(lm_weight=1.0, **cfg),
        data,
        tmp_path / "teacher",
    )
    lm = train(
        tmp_path / "prune" / "ckpt",
        tmp_path / "lm",
        DistillConfig(mode="lm", **cfg),
        data,
    )
    mcore_to_hf(kd, tmp_path / "kd_hf")
    mcore_to_hf(lm, tmp_path / "lm_hf")
    losses = {
        name: heldout_loss(load_hf_model(path), heldout.split(4))
        for name, path in [
            ("teacher", hf_dir),
            ("pruned", tmp_path / "prune" / "hf"),
            ("distilled", tmp_path / "kd_hf"),
            ("lm_only", tmp_path / "lm_hf"),
        ]
    }
    tokens_per_s = [m["tokens_per_s"] for m in read_metrics(tmp_path / "kd")][1:]
    print(
        json.dumps(
            {"heldout_loss": losses, "kd_tokens_per_s": sum(tokens_per_s) / len(tokens_per_s)}
        )
    )
    assert losses["distilled"] < losses["pruned"]
    assert losses["distilled"] < losses["lm_only"]
    assert torch.isfinite(torch.tensor(list(losses.values()))).all()
