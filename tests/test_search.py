"""Architecture search: the enumeration is exactly the budget's valid grid; the search on a tiny
model picks by held-out loss after the short distillation and, killed mid-distillation and
rerun, gives the same candidates, losses and choice as an uninterrupted search."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from minitron_nemo.config import DistillConfig, PruneConfig, SearchConfig
from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.prune.plan import target_arch
from minitron_nemo.prune.search import spearman
from minitron_nemo.prune.search_space import axis_values, count_params, enumerate_candidates
from minitron_nemo.prune.stage import run_prune
from tests.helpers import (
    QWEN3_30B_A3B,
    REPO,
    VOCAB,
    arch_from_config,
    make_tiny_hf,
    random_documents,
    tiny_config,
    token_data_spec,
)

LLAMA_8B = ModelArch("llama", 128256, 4096, 14336, 32, 32, 8, 128, 131072, 5e5, 1e-5)


def _p1_space(**overrides) -> SearchConfig:
    base = dict(
        target_params=4_500_000_000, tolerance=0.03, hidden_size_step=512,
        ffn_hidden_size_step=1024, max_width_reduction=0.5, max_depth_reduction=0.5,
        max_candidates=1000,
    )  # fmt: skip
    return SearchConfig(**{**base, **overrides})


def test_enumeration_is_exactly_the_valid_grid_in_budget():
    search = _p1_space()
    found = {
        (a.num_layers, a.hidden_size, a.ffn_hidden_size, a.num_attention_heads)
        for a in enumerate_candidates(LLAMA_8B, search, tp=8)
    }
    # Brute force over every integer size in the limits: valid + in budget + on the steps.
    expected = set()
    for layers, hidden, ffn, per_group in itertools.product(
        range(16, 33), range(2048, 4097, 256), range(7168, 14337, 512), range(2, 5)
    ):
        on_steps = (hidden == 4096 or hidden % 512 == 0) and (ffn == 14336 or ffn % 1024 == 0)
        if not on_steps:
            continue
        sizes = dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                     num_attention_heads=per_group * 8)  # fmt: skip
        try:
            arch = target_arch(LLAMA_8B, PruneConfig(**sizes), tp=8)
        except MinitronError:
            continue
        if 0.97 * 4.5e9 <= arch.num_parameters() <= 4.5e9:
            expected.add((layers, hidden, ffn, per_group * 8))
    assert found == expected and len(found) > 20
    assert min(f[0] for f in found) >= 16 and min(f[1] for f in found) >= 2048
    assert min(f[2] for f in found) >= 7168 and min(f[3] for f in found) >= 16
    narrow = enumerate_candidates(LLAMA_8B, _p1_space(max_depth_reduction=0.2), tp=8)
    assert min(a.num_layers for a in narrow) >= 26
    non_emb = _p1_space(count="non_embedding", target_params=3_500_000_000)
    for arch in enumerate_candidates(LLAMA_8B, non_emb, tp=8):
        assert 0.97 * 3.5e9 <= count_params(arch, "non_embedding") <= 3.5e9


def test_impossible_budget_and_explicit_sizes_are_refused():
    with pytest.raises(MinitronError, match="no architecture"):
        enumerate_candidates(LLAMA_8B, _p1_space(target_params=1_000_000_000))
    with pytest.raises(MinitronError, match="remove prune.hidden_size"):
        PruneConfig(hidden_size=512, search=_p1_space())
    with pytest.raises(MinitronError, match="max_candidates"):
        enumerate_candidates(LLAMA_8B, _p1_space(max_candidates=3), tp=8)


def _moe_space(**overrides) -> SearchConfig:
    base = dict(target_active_params=2_600_000_000, target_memory_mb=40_000, tolerance=0.05,
                hidden_size_step=256, num_moe_experts_step=32, moe_ffn_hidden_size_step=128,
                max_width_reduction=0.5, num_layers_step=8, max_candidates=1000)  # fmt: skip
    return SearchConfig(**{**base, **overrides})


def test_moe_enumeration_meets_the_active_and_memory_budgets():
    """Qwen3-30B-A3B (3.35B active, 58,619 MiB of bf16 weights + KV cache at 4096 tokens) into
    2.6B active and 40,000 MiB: the enumeration is exactly the grid's valid architectures within
    both budgets that use at least 95% of one; expert count, expert width and the dense axes
    all move; every candidate keeps >= the router's top-k experts."""
    source = arch_from_config(QWEN3_30B_A3B)
    search = _moe_space()
    found = {
        (a.num_layers, a.hidden_size, a.num_attention_heads, a.num_experts, a.moe_ffn_hidden_size)
        for a in enumerate_candidates(source, search, tp=4, pp=2)
    }
    expected = set()
    for layers, hidden, per_group, experts, width in itertools.product(
        (48, 40, 32, 24), range(1024, 2049, 256), range(4, 9), (128, 96, 64), (768, 640, 512, 384)
    ):
        sizes = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=per_group * 4,
                     num_moe_experts=experts, moe_ffn_hidden_size=width)  # fmt: skip
        try:
            arch = target_arch(source, PruneConfig(**sizes), tp=4, pp=2)
        except MinitronError:
            continue
        active = arch.num_parameters(active=True) / 2.6e9
        # weights + KV cache (2 x layers x kv heads x head_dim x 4096 tokens), 2 bytes each
        kv = 2 * layers * 4 * 128 * 4096
        memory = 2 * (arch.num_parameters() + kv) / 2**20 / 40_000
        if max(active, memory) <= 1 and max(active, memory) >= 0.95:
            expected.add((layers, hidden, per_group * 4, experts, width))
    assert found == expected and len(found) > 10
    for i in range(5):  # every axis moves
        assert len({f[i] for f in found}) > 1, i
    both = [f for f in found if f[3] < 128 and f[4] < 768]
    assert both, "expert count and width pruned together"
    only_active = enumerate_candidates(source, _moe_space(target_memory_mb=None), tp=4, pp=2)
    assert {a.num_experts for a in only_active} == {128, 96, 64}  # experts barely move "active"
    grid = axis_values(source, _moe_space(axes=["num_moe_experts"], num_moe_experts_step=6,
                                          max_expert_reduction=0.99))  # fmt: skip
    assert grid == {"num_moe_experts": [128, *range(126, 11, -6)]}  # 6 < top-k 8: left out


def test_search_axes_and_budgets_are_checked():
    source = arch_from_config(QWEN3_30B_A3B)
    with pytest.raises(MinitronError, match="has no ffn_hidden_size to search"):
        enumerate_candidates(source, _moe_space(axes=["ffn_hidden_size"]))
    with pytest.raises(MinitronError, match="has no num_moe_experts to search"):
        enumerate_candidates(LLAMA_8B, _p1_space(axes=["num_moe_experts"]))
    with pytest.raises(MinitronError, match="no moe_shared_expert_intermediate_size"):
        enumerate_candidates(source, _moe_space(axes=["moe_shared_expert_intermediate_size"]))
    with pytest.raises(MinitronError, match="expected a budget"):
        SearchConfig()
    with pytest.raises(MinitronError, match="target_memory_mb: expected > 0"):
        SearchConfig(target_memory_mb=-1)
    with pytest.raises(MinitronError, match=r"target_active_params = 1,000 \(source: 3,35"):
        enumerate_candidates(source, _moe_space(target_active_params=1000), tp=4, pp=2)


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == 1.0
    assert spearman([1, 2, 3], [3, 2, 1]) == -1.0


# -- the search on a tiny model ------------------------------------------------------------
SEARCH = dict(
    target_params=131_000, tolerance=0.12, axes=["ffn_hidden_size", "num_layers"],
    ffn_hidden_size_step=8, top_k=2, steps=2, eval_every=1,
)  # fmt: skip
DISTILL = dict(global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=1,
               kd_chunk_tokens=7)  # fmt: skip

KILLED = """
import json, sys
from pathlib import Path
from functools import partial
from minitron_nemo.config import DistillConfig, PruneConfig, SearchConfig
from minitron_nemo.data.datasets import DataSpec
from minitron_nemo.distill.trainer import TrainHooks
from minitron_nemo.prune.stage import run_prune
from tests.fault_hooks import kill_at
spec = json.loads(Path(sys.argv[1]).read_text())
cfg = PruneConfig(search=SearchConfig(**spec["search"]), depth_eval_samples=4,
                  micro_batch_size=2, hf_output=False)
hooks = TrainHooks(after_step=partial(kill_at, 1))  # dies in the first short distillation
run_prune(Path(spec["ckpt"]), Path(spec["out"]), cfg, DataSpec(**spec["data"]),
          distill=DistillConfig(**spec["distill"]), hooks=hooks)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    make_tiny_hf("llama", root / "hf", seed=7, head_dim=16)
    hf_to_mcore(root / "hf", root / "mc")
    docs = random_documents(40, 25, seed=3)
    data = token_data_spec(root / "data", docs, seq_length=16, split="80,0,20",
                           heldout_samples=8, calibration_samples=12)  # fmt: skip
    return root, data


def _prune_cfg() -> PruneConfig:
    return PruneConfig(search=SearchConfig(**SEARCH), depth_eval_samples=4, micro_batch_size=2,
                       hf_output=False)  # fmt: skip


def test_search_picks_after_distillation_and_resumes_after_a_kill(tiny, tmp_path):
    import dataclasses

    root, data = tiny
    full = run_prune(root / "mc", tmp_path / "full" / "prune", _prune_cfg(), data,
                     distill=DistillConfig(**DISTILL))["search"]  # fmt: skip
    rows = full["candidates"]
    assert len(rows) == 4 and all(115_000 <= r["params"] <= 131_000 for r in rows)
    kept = [r for r in rows if r["final_loss"] is not None]
    assert len(kept) == 2 and {r["zero_shot_rank"] for r in kept} == {1, 2}
    assert all([s for s, _ in r["curve"]] == [0, 1, 2] for r in kept)
    best = min(kept, key=lambda r: r["final_loss"])
    assert full["chosen"] == best["name"] and best["final_rank"] == 1
    assert (tmp_path / "full" / "prune" / "plots" / "search.png").is_file()
    chosen_arch = ModelArch.load(tmp_path / "full" / "prune" / "ckpt" / "arch.yaml")
    assert chosen_arch.num_layers == best["arch"]["num_layers"]
    assert chosen_arch.ffn_hidden_size == best["arch"]["ffn_hidden_size"]

    spec = {
        "ckpt": str(root / "mc"),
        "out": str(tmp_path / "killed" / "prune"),
        "search": SEARCH,
        "distill": DISTILL,
        "data": dataclasses.asdict(data),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    # Own session, output to a file: a SIGKILLed trainer leaves dist-checkpoint helper
    # processes that would keep a pipe open; stragglers are killed.
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED, str(tmp_path / "spec.json")], cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.wait(timeout=600) != 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert not (tmp_path / "killed" / "prune").exists()  # no half-written stage output
    work = tmp_path / "killed" / "prune_search"
    assert len(list(work.glob("c*/zero_shot.json"))) == 4 and not list(work.glob("c*/result.json"))
    resumed = run_prune(root / "mc", tmp_path / "killed" / "prune", _prune_cfg(), data,
                        distill=DistillConfig(**DISTILL))["search"]  # fmt: skip
    assert resumed["candidates"] == full["candidates"]
    assert resumed["chosen"] == full["chosen"]


# -- a planted case: the zero-shot ranking and the post-distillation ranking disagree -------
def _markov_documents(n: int, length: int, seed: int) -> list[list[int]]:
    """Token i + 1 follows a fixed permutation of token i 9 times in 10 (else uniform)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(99)) + 3
    docs = []
    for _ in range(n):
        doc = [int(torch.randint(3, VOCAB, (1,), generator=g))]
        for _ in range(length - 1):
            other = int(torch.randint(3, VOCAB, (1,), generator=g))
            doc.append(int(perm[doc[-1] - 3]) if torch.rand(1, generator=g) < 0.9 else other)
        docs.append(doc)
    return docs


def _planted_teacher(out, scale: float = 1000.0):
    """A 3-layer Llama trained on Markov text, then two function-preserving changes:
    - a 4th layer that does nothing (attention and MLP outputs zero): dropping it costs no loss,
      so the depth candidate is the teacher itself zero-shot (and the best zero-shot);
    - in every trained layer, MLP neurons 64..95 rescaled: up_proj / scale, down_proj * scale.
      Same function, but their activations are tiny (the width candidate prunes exactly them)
      and any optimizer step is huge relative to their up_proj weights while down_proj
      amplifies it: a candidate that keeps them (the depth one) is wrecked by training."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    trained = AutoModelForCausalLM.from_config(
        tiny_config("llama", head_dim=16, num_hidden_layers=3)
    )
    docs = torch.tensor(_markov_documents(2000, 25, seed=4))
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = docs[torch.randint(0, len(docs), (16,), generator=g)]
        loss = trained(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = AutoModelForCausalLM.from_config(tiny_config("llama", head_dim=16, num_hidden_layers=4))
    with torch.no_grad():
        model.load_state_dict(trained.state_dict(), strict=False)
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
        for layer in model.model.layers[:3]:
            layer.mlp.up_proj.weight[64:] /= scale
            layer.mlp.down_proj.weight[:, 64:] *= scale
    model.save_pretrained(out)


def test_planted_case_the_search_picks_by_the_post_distillation_ranking(tmp_path):
    from minitron_nemo.eval.heldout import heldout_losses

    _planted_teacher(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
    data = token_data_spec(tmp_path / "data", _markov_documents(60, 25, seed=3), seq_length=16,
                           split="75,0,25", heldout_samples=16, calibration_samples=12)  # fmt: skip
    # Budget: exactly two candidates, 4 layers with ffn 64 (width) and 3 layers (depth).
    search = SearchConfig(target_params=131_000, tolerance=0.06,
                          axes=["ffn_hidden_size", "num_layers"], ffn_hidden_size_step=32,
                          top_k=2, steps=2, eval_every=2)  # fmt: skip
    cfg = PruneConfig(search=search, depth_method="block_importance", micro_batch_size=2,
                      depth_eval_samples=4, hf_output=False)  # fmt: skip
    found = run_prune(tmp_path / "mc", tmp_path / "prune", cfg, data,
                      distill=DistillConfig(**DISTILL))["search"]  # fmt: skip
    rows = {r["name"]: r for r in found["candidates"]}
    assert set(rows) == {"L3", "ffn64"}
    teacher = heldout_losses({"t": tmp_path / "mc"}, data, tmp_path / "t.json")["t"]
    # Zero-shot the depth candidate is the teacher exactly, and ranks first ...
    assert rows["L3"]["zero_shot_loss"] == pytest.approx(teacher["heldout_loss"], abs=1e-6)
    assert rows["L3"]["zero_shot_rank"] == 1 and rows["ffn64"]["zero_shot_rank"] == 2
    # ... after the short distillation the order is reversed (by far), and that decides.
    assert rows["ffn64"]["final_loss"] + 1.0 < rows["L3"]["final_loss"]
    assert rows["ffn64"]["final_rank"] == 1
    assert found["chosen"] == "ffn64" and found["spearman_zero_shot_vs_distilled"] == -1.0
