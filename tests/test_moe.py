"""MoE models (Qwen3-MoE, Qwen2-MoE, Mixtral) beyond logit parity (tests/test_convert.py):
gradients equal to transformers' at EP=1 and EP=2, checkpoints saved at EP=2 export (and so
load at EP=1) bit for bit, parameter counts against model cards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minitron_nemo.convert import transforms
from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from minitron_nemo.convert.mcore_to_hf import mcore_to_hf
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.families import family_by_name
from tests.helpers import (
    MIXTRAL_8X7B,
    QWEN3_30B_A3B,
    REPO,
    VOCAB,
    arch_from_config,
    make_tiny_hf,
    max_rel_err,
    run_worker,
)
from tests.test_convert import _hf_state

GRAD_FAMILIES = ["qwen3_moe", "qwen2_moe"]  # top-k-then-softmax; softmax-then-top-k + shared
GRAD_TOL = 1e-5


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    models = {}
    for i, name in enumerate(GRAD_FAMILIES):
        hf = make_tiny_hf(name, root / f"{name}_hf", seed=10 + i)
        hf_to_mcore(hf, root / name)
        models[name] = {"hf": hf, "ckpt": root / name}
    return models


def _hf_grads(hf_dir: Path, tokens_bs: torch.Tensor, weights_bsv: torch.Tensor):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    (model(tokens_bs).logits * weights_bsv).sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if ".layers.0." in n}


@pytest.mark.dist
@pytest.mark.parametrize("ep", [1, 2])
def test_gradients_equal_transformers(moe_models, ep, tmp_path):
    """Router, attention and expert gradients of layer 0 equal transformers'. At EP=2 each
    rank runs its own tokens: router / attention gradients are those of the rank's tokens,
    a rank's expert gradients the sum over both ranks' tokens (the alltoall brings them)."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (ep, 2, 16), generator=g)
    weights = torch.randn(ep, 2, 16, VOCAB, generator=g)
    torch.save(tokens, tmp_path / "tokens.pt")
    torch.save(weights, tmp_path / "weights.pt")
    ckpts = [str(moe_models[f]["ckpt"]) for f in GRAD_FAMILIES]
    files = [str(tmp_path / n) for n in ("tokens.pt", "weights.pt")]
    run_worker(REPO / "tests/dist/moe_grad_worker.py", ep, *files, str(tmp_path), *ckpts)
    for family in GRAD_FAMILIES:
        arch = ModelArch.load(moe_models[family]["ckpt"] / "arch.yaml")
        rules = {r.mcore: r for r in family_by_name(arch.family).rules(arch)}
        hf = [_hf_grads(moe_models[family]["hf"], tokens[r], weights[r]) for r in range(ep)]
        checked = 0
        for rank in range(ep):
            ours = torch.load(tmp_path / f"{family}_rank{rank}.pt")
            hf_r = hf[rank]
            mlp = "model.layers.0.mlp."
            expected = {
                "decoder.layers.*.mlp.router.weight": hf_r[mlp + "gate.weight"],
                "decoder.layers.*.self_attention.linear_qkv.weight": transforms.hf_to_mcore(
                    rules["decoder.layers.*.self_attention.linear_qkv.weight"],
                    [hf_r[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"],
                    arch,
                ),
            }
            if arch.moe_shared_expert_gate:
                expected["decoder.layers.*.mlp.shared_experts.gate_weight"] = hf_r[
                    mlp + "shared_expert_gate.weight"
                ]
            for e in range(arch.num_experts):
                fc = f"decoder.layers.*.mlp.experts.local_experts.{e}.linear_fc"
                if fc + "1.weight" not in ours:
                    continue  # on the other rank
                expected[fc + "1.weight"] = sum(h[mlp + "experts.gate_up_proj"][e] for h in hf)
                expected[fc + "2.weight"] = sum(h[mlp + "experts.down_proj"][e] for h in hf)
            for name, want in expected.items():
                err = max_rel_err(ours[name], want)
                assert err < GRAD_TOL, f"{family} ep={ep} rank {rank} {name}: {err:.2e}"
                checked += 1
        # every expert's fc1 and fc2 was compared on exactly one rank
        assert checked == ep * (2 + arch.moe_shared_expert_gate) + 2 * arch.num_experts


@pytest.mark.dist
@pytest.mark.parametrize("family", ["qwen3_moe_nonorm", "mixtral"])
def test_ep2_checkpoint_exports_bitwise(family, tmp_path):
    """Converted at EP=2 (each rank writes its experts), read back by one process (EP=1):
    every HF tensor equal to the original, names as on disk (Mixtral's block_sparse_moe.*)."""
    hf = make_tiny_hf(family, tmp_path / "hf", seed=5)
    hf_to_mcore(hf, tmp_path / "mc_ep2", ep=2)
    mcore_to_hf(tmp_path / "mc_ep2", tmp_path / "out")
    original, exported = _hf_state(hf), _hf_state(tmp_path / "out")
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize(
    "config,total,active",
    [(QWEN3_30B_A3B, 30.5e9, 3.3e9), (MIXTRAL_8X7B, 46.7e9, 12.9e9)],
    ids=["qwen3-30b-a3b", "mixtral-8x7b"],
)
def test_parameter_counts_match_model_cards(config, total, active):
    """Total and active (per token: attention, router, top-k experts, embeddings and output
    layer) parameters from the config alone. Measured: Qwen3-30B-A3B 30.53B / 3.353B (the card
    prints 3.3B), Mixtral-8x7B 46.70B / 12.88B; without the embedding table the active counts
    would be 2.73B / 12.62B, so the cards count it."""
    arch = arch_from_config(config)
    assert abs(arch.num_parameters() - total) / total < 0.005
    assert abs(arch.num_parameters(active=True) - active) / active < 0.02
    assert arch.num_parameters(active=True, include_embeddings=False) < 0.98 * active


@pytest.mark.parametrize(
    "config,kv_bytes_per_token", [(QWEN3_30B_A3B, 2 * 48 * 4 * 128 * 2),
                                  (MIXTRAL_8X7B, 2 * 32 * 8 * 128 * 2)],
    ids=["qwen3-30b-a3b", "mixtral-8x7b"],
)  # fmt: skip
def test_memory_is_bf16_weights_plus_kv_cache(config, kv_bytes_per_token):
    """Keys and values of every layer, kv heads x head_dim each, 2 bytes: Qwen3-30B-A3B
    96 KiB per token (384 MiB for 4096 tokens), Mixtral-8x7B 128 KiB (512 MiB); weights 2 bytes
    per parameter, every expert counted."""
    arch = arch_from_config(config)
    assert kv_bytes_per_token in (96 * 1024, 128 * 1024)
    weights = 2 * arch.num_parameters()
    assert arch.memory_bytes(4096, 1) == weights + 4096 * kv_bytes_per_token
    assert arch.memory_bytes(1000, 3) == weights + 3000 * kv_bytes_per_token


# -- training ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kd_moe(tmp_path_factory):
    """A Qwen3-MoE teacher (4 layers, 4 experts, layer 2 dense), an MoE student (2 layers,
    narrower experts), a dense Llama student, and 46 samples of 17 random tokens."""
    from tests.helpers import random_documents, token_data_spec

    root = tmp_path_factory.mktemp("kd_moe")
    make_tiny_hf("qwen3_moe_nonorm", root / "teacher_hf", seed=1)
    hf_to_mcore(root / "teacher_hf", root / "teacher")
    make_tiny_hf("qwen3_moe", root / "student_hf", seed=2, num_hidden_layers=2,
                 moe_intermediate_size=16)  # fmt: skip
    hf_to_mcore(root / "student_hf", root / "student")
    make_tiny_hf("llama", root / "dense_hf", seed=3, num_hidden_layers=2, intermediate_size=64)
    hf_to_mcore(root / "dense_hf", root / "dense")
    data = token_data_spec(root / "data", random_documents(30, 25), seq_length=16)
    return root, data


def _moe_cfg(**overrides):
    from minitron_nemo.config import DistillConfig

    base = dict(steps=6, global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                warmup_steps=1, save_every=2, kd_chunk_tokens=7, lm_weight=0.5)  # fmt: skip
    return DistillConfig(**{**base, **overrides})


@pytest.mark.dist
def test_moe_distillation_ep2_equals_ep1_logs_aux_loss_and_resumes_bitwise(kd_moe, tmp_path):
    """MoE teacher -> MoE student at DP=2: with the experts split over 2 ranks (EP=2, tokens
    exchanged by alltoall) the losses equal EP=1's; the router's load-balancing loss is a
    term of its own; a run killed after step 3 resumes from step 2 to the same losses and
    bitwise the same weights."""
    import dataclasses

    from minitron_nemo.distill.checkpoints import latest_checkpoint
    from minitron_nemo.distill.train import train
    from tests.test_distill import _losses, _run_subprocess, _weights

    root, data = kd_moe
    cfg = _moe_cfg()
    train(root / "student", tmp_path / "ep1", cfg, data, root / "teacher", dp=2, ep=1)
    train(root / "student", tmp_path / "ep2", cfg, data, root / "teacher", dp=2, ep=2)
    ep1, ep2 = _losses(tmp_path / "ep1"), _losses(tmp_path / "ep2")
    assert ep2 == pytest.approx(ep1, rel=1e-5)
    aux = _losses(tmp_path / "ep2", "loss_moe_aux")
    assert len(aux) == 6 and all(0 < a < 10 for a in aux)
    assert aux == pytest.approx(_losses(tmp_path / "ep1", "loss_moe_aux"), rel=1e-5)
    assert ep2[-1] < ep2[0]

    spec = {"student": str(root / "student"), "teacher": str(root / "teacher"),
            "out": str(tmp_path / "killed"), "cfg": cfg.__dict__,
            "data": dataclasses.asdict(data), "dp": 2, "ep": 2}  # fmt: skip
    assert _run_subprocess({**spec, "kill_after_step": 3}, tmp_path / "spec.json") != 0
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_000002"
    assert _run_subprocess(spec, tmp_path / "spec.json") == 0
    assert _losses(tmp_path / "killed") == ep2
    w_full = _weights(tmp_path / "ep2" / "checkpoints" / "step_000006")
    w_res = _weights(tmp_path / "killed" / "checkpoints" / "step_000006")
    assert w_full.keys() == w_res.keys() and all(torch.equal(w_res[k], w_full[k]) for k in w_full)


@pytest.mark.dist
def test_dense_student_distills_from_an_moe_teacher_at_ep2(kd_moe, tmp_path):
    """A dense student ignores the expert grid: distilled from the MoE teacher with its experts
    split over 2 ranks it trains exactly as with EP=1; no router loss is logged."""
    from minitron_nemo.distill.train import train
    from tests.test_distill import _losses

    root, data = kd_moe
    cfg = _moe_cfg(steps=3, save_every=3)
    for ep in (1, 2):
        train(root / "dense", tmp_path / f"ep{ep}", cfg, data, root / "teacher", dp=2, ep=ep)
    assert _losses(tmp_path / "ep2") == pytest.approx(_losses(tmp_path / "ep1"), rel=1e-5)
    assert _losses(tmp_path / "ep2", "loss_logits")[0] > 0
    assert "loss_moe_aux" not in read_metrics_keys(tmp_path / "ep2")


@pytest.mark.dist
def test_teacher_cache_of_an_moe_teacher_at_ep2_equals_one_rank(kd_moe, tmp_path):
    """The teacher's top-K cache built with its experts split over 2 ranks (DP=2, EP=2) holds
    the same tokens, ids and log-probabilities as one rank's."""
    import dataclasses

    from minitron_nemo.distill.teacher_cache import TeacherCache, build_teacher_cache

    root, data = kd_moe
    data = dataclasses.replace(data, train_samples=8)
    caches = [
        TeacherCache(
            build_teacher_cache(
                root / "teacher",
                data,
                tmp_path / f"ep{ep}",
                5,
                value_dtype="float32",
                dp=ep,
                ep=ep,
                micro_batch=2,
                round_samples=4,
                chunk_tokens=7,
            )
        )  # fmt: skip
        for ep in (1, 2)
    ]
    samples = list(range(8))
    one, two = (c.read(samples) for c in caches)
    assert torch.equal(caches[1].tokens(samples), caches[0].tokens(samples))
    assert torch.equal(two.ids, one.ids)
    torch.testing.assert_close(two.logp, one.logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(two.log_tail, one.log_tail, rtol=1e-5, atol=1e-5)


def read_metrics_keys(out: Path) -> set[str]:
    from minitron_nemo.metrics import read_metrics

    return {k for m in read_metrics(out) for k in m}


@pytest.mark.dist
def test_minitron_run_on_an_moe_teacher(tmp_path):
    """`minitron run` on a Qwen2-MoE teacher (shared expert, one dense layer): prune in hidden,
    heads and depth, distill at DP=2 / EP=2 with the router loss, export, held-out loss (at EP=2,
    equal to EP=1's; 3 micro-batches over 2 ranks, so one rank runs an uncounted repeat) and
    lm-eval on the exported MoE, report."""
    import json

    from minitron_nemo.config import load_config
    from minitron_nemo.stages import Pipeline
    from tests.helpers import make_tiny_teacher_with_tokenizer, synthetic_text
    from tests.test_pipeline import tiny_overrides

    text = synthetic_text()
    (tmp_path / "corpus.txt").write_text(text)
    make_tiny_teacher_with_tokenizer(tmp_path / "teacher_hf", text, family="qwen2_moe")
    overrides = tiny_overrides(tmp_path, tmp_path / "run")  # ffn 64 prunes the dense layer
    overrides += ["prune.num_layers=3", "parallel.dp=2", "parallel.ep=2", "scratch=false",
                  "eval.heldout_batch_size=2"]  # fmt: skip
    pipeline = Pipeline(load_config(REPO / "recipes/smollm2_135m_cpu.yaml", overrides))
    pipeline.run()
    run = tmp_path / "run"
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results) >= {"teacher", "pruned (no training)", "distilled"}
    from minitron_nemo.eval.heldout import heldout_losses

    models = {
        "teacher": pipeline.stage_dir("teacher"),
        "distilled": pipeline.final_checkpoint("distill"),
    }
    ep1 = heldout_losses(models, pipeline.data_spec(), tmp_path / "ep1.json", 2)
    for name, entry in ep1.items():
        assert entry["heldout_tokens"] == results[name]["heldout_tokens"] > 0
        assert results[name]["heldout_loss"] == pytest.approx(entry["heldout_loss"], rel=1e-6)
    assert results["distilled"]["params"] < results["teacher"]["params"]
    assert 0 <= results["distilled"]["tasks"]["arc_easy"]["acc"] <= 1
    from minitron_nemo.metrics import read_metrics

    assert all(m["loss_moe_aux"] > 0 for m in read_metrics(run / "distill"))
    config = json.loads((run / "export" / "student" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_hidden_layers"] == 3
    assert (config["num_experts"], config["shared_expert_intermediate_size"]) == (4, 48)
    assert (run / "report" / "report.md").is_file()


# -- expert pruning ----------------------------------------------------------------------
FREQUENT_IDLE, RARE_STRONG = 0, 1


MOE_LAYERS = (0, 1)  # layers 2 and 3 are dense MLPs


def _plant_experts(hf_dir: Path) -> None:
    """In every MoE layer: expert 0 picked for nearly every token but its output scaled to ~0;
    expert 1 rarely picked (measured: 2-6% of the tokens), its output x20 (it matters whenever
    it is picked). Routing is steered through a residual channel held positive for every token
    (embedding channel 0 set to 0.5): the router row of expert 0 reads it (+1); that of expert
    1 reads only it (-0.2), so expert 1 takes the second slot only when both other experts
    score below it."""
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    state = load_file(path)
    state["model.embed_tokens.weight"][:, 0] = 0.5
    for layer in MOE_LAYERS:
        mlp = f"model.layers.{layer}.mlp."
        state[mlp + "gate.weight"][:, 0] = 0.0
        state[mlp + "gate.weight"][FREQUENT_IDLE, 0] = 1.0
        state[mlp + "gate.weight"][RARE_STRONG] = 0.0
        state[mlp + "gate.weight"][RARE_STRONG, 0] = -0.2
        state[mlp + f"experts.{FREQUENT_IDLE}.down_proj.weight"] *= 1e-4
        state[mlp + f"experts.{RARE_STRONG}.down_proj.weight"] *= 20
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def planted_moe(tmp_path_factory):
    from minitron_nemo.prune.stage import run_prune  # noqa: F401  (import before the fixture)
    from tests.helpers import random_documents, token_data_spec

    root = tmp_path_factory.mktemp("planted_moe")
    docs = random_documents(40, 33, seed=4)
    data = token_data_spec(root / "data", docs, seq_length=32, calibration_samples=24,
                           split="80,0,20", heldout_samples=8)  # fmt: skip
    hf = make_tiny_hf("qwen3_moe", root / "hf", seed=7, mlp_only_layers=[2, 3])
    _plant_experts(hf)
    hf_to_mcore(hf, root / "mc")
    return root, data


def test_planted_experts_default_keeps_the_rare_strong_one(planted_moe, tmp_path):
    """Expert pruning 4 -> 2 per layer: frequency keeps the busy expert that does nothing and
    drops the rarely picked one that matters; the default (reap) does the opposite. The pruned
    megatron model's logits equal a transformers model sliced by hand to the kept experts."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from minitron_nemo.config import PruneConfig
    from minitron_nemo.prune.stage import run_prune

    root, data = planted_moe
    reports = {}
    for score in ("frequency", "reap", "taylor", "router_mass"):
        cfg = PruneConfig(num_moe_experts=2, expert_score=score, depth_scores=False,
                          depth_eval_samples=4, micro_batch_size=4,
                          importance=str(tmp_path / "frequency" / "importance.pt")
                          if score != "frequency" else None,
                          plots=score in ("frequency", "reap"))  # fmt: skip
        reports[score] = run_prune(root / "mc", tmp_path / score, cfg, data)
    imp = torch.load(tmp_path / "frequency" / "importance.pt", weights_only=False)
    assert sorted(imp["experts"]) == list(MOE_LAYERS)
    for layer in MOE_LAYERS:
        freq = imp["experts"][layer]["frequency"]
        assert freq[FREQUENT_IDLE] > 0.9 and freq[RARE_STRONG] < 0.2, (layer, freq)
        assert reports["frequency"]["kept_experts"][str(layer)][0] == FREQUENT_IDLE
        assert RARE_STRONG not in reports["frequency"]["kept_experts"][str(layer)]
        for score in ("reap", "taylor"):
            kept = reports[score]["kept_experts"][str(layer)]
            assert RARE_STRONG in kept and FREQUENT_IDLE not in kept, (score, layer, kept)

    # transformers, sliced by hand: router rows and experts renumbered, nothing else touched
    state = load_file(root / "hf" / "model.safetensors")
    sliced = {
        k: v for k, v in state.items() if not any(f"layers.{i}.mlp." in k for i in MOE_LAYERS)
    }
    for layer in MOE_LAYERS:
        mlp = f"model.layers.{layer}.mlp."
        kept = reports["reap"]["kept_experts"][str(layer)]
        sliced[mlp + "gate.weight"] = state[mlp + "gate.weight"][kept].clone()
        for j, e in enumerate(kept):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                sliced[mlp + f"experts.{j}.{proj}.weight"] = state[
                    mlp + f"experts.{e}.{proj}.weight"
                ]
    hand = tmp_path / "hand"
    hand.mkdir()
    save_file(sliced, str(hand / "model.safetensors"), metadata={"format": "pt"})
    config = AutoConfig.from_pretrained(root / "hf")
    config.num_experts = 2
    config.save_pretrained(hand)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(hand).eval()(tokens).logits
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "reap" / "hf").eval()
        assert max_rel_err(exported(tokens).logits, expected) < 1e-5
    from tests.test_prune import _logits_of

    assert max_rel_err(_logits_of(tmp_path / "reap" / "ckpt", tokens), expected) < 1e-5
    # top-2 of 2 instead of 4: a token goes through as many expert weights, the router lost rows
    active = reports["reap"]["active_params_before"] - reports["reap"]["active_params_after"]
    assert active == len(MOE_LAYERS) * 2 * 64
    assert (tmp_path / "reap" / "plots" / "experts.png").stat().st_size > 1000
    assert not (tmp_path / "taylor" / "plots").exists()  # prune.plots=false: no PNGs drawn


@pytest.mark.dist
def test_expert_importance_at_ep2_equals_ep1(planted_moe, tmp_path):
    """Calibration at EP=2 (two ranks holding two experts each, each reading half of every
    calibration micro-batch with its loss scaled by its share) gives the scores of one rank
    reading every sample: every expert score, the expert neurons, heads (taylor and activation),
    channels, dense neurons and block importance; the same experts are kept."""
    from minitron_nemo.config import PruneConfig
    from minitron_nemo.prune.stage import run_prune

    root, data = planted_moe
    cfg = PruneConfig(num_moe_experts=2, expert_score="taylor", depth_scores=False,
                      depth_eval_samples=4, micro_batch_size=4)  # fmt: skip
    reports = {ep: run_prune(root / "mc", tmp_path / f"ep{ep}", cfg, data, ep=ep) for ep in (1, 2)}
    imps = {ep: torch.load(tmp_path / f"ep{ep}" / "importance.pt", weights_only=False)
            for ep in (1, 2)}  # fmt: skip
    for key in ("heads_activation", "heads_taylor", "neurons", "channels", "block_importance"):
        torch.testing.assert_close(imps[2][key], imps[1][key], rtol=1e-6, atol=1e-12, msg=key)
    assert sorted(imps[2]["experts"]) == list(MOE_LAYERS)
    for layer, scores in imps[1]["experts"].items():
        assert set(imps[2]["experts"][layer]) == set(scores)
        for name, value in scores.items():
            torch.testing.assert_close(imps[2]["experts"][layer][name], value, rtol=1e-6,
                                       atol=1e-12, msg=f"layer {layer} {name}")  # fmt: skip
    assert reports[2]["kept_experts"] == reports[1]["kept_experts"]


def test_search_in_total_and_active_budgets_prunes_experts_and_their_width(planted_moe, tmp_path):
    """prune.search on the planted MoE (193,024 params, 168,448 active) within 175,000 total
    and 165,000 active: exactly two candidates fit (experts 4 -> 3 or 2 and width 32 -> 24;
    2 experts at full width is over the active budget); the winner keeps the rarely picked
    expert that matters in every MoE layer, exports, and loads in transformers with the
    megatron model's logits."""
    from transformers import AutoModelForCausalLM

    from minitron_nemo.config import DistillConfig, PruneConfig, SearchConfig
    from minitron_nemo.prune.stage import run_prune
    from tests.test_prune import _logits_of

    root, data = planted_moe
    search = SearchConfig(target_params=175_000, target_active_params=165_000, tolerance=0.1,
                          axes=["num_moe_experts", "moe_ffn_hidden_size"], num_moe_experts_step=1,
                          moe_ffn_hidden_size_step=8, top_k=1, steps=1, eval_every=1,
                          teacher_cache_k=None)  # fmt: skip
    cfg = PruneConfig(search=search, depth_scores=False, depth_eval_samples=4, micro_batch_size=4)
    distill = DistillConfig(global_batch_size=4, micro_batch_size=4, warmup_steps=0)
    report = run_prune(root / "mc", tmp_path / "prune", cfg, data, distill=distill)
    found = report["search"]
    assert sorted(c["name"] for c in found["candidates"]) == ["E2-eff24", "E3-eff24"]
    for c in found["candidates"]:
        assert c["params"] <= 175_000 and c["active_params"] <= 165_000, c
    chosen = ModelArch.load(tmp_path / "prune" / "ckpt" / "arch.yaml")
    assert chosen.moe_ffn_hidden_size == 24 and chosen.num_experts in (2, 3)
    for layer in MOE_LAYERS:
        assert RARE_STRONG in report["kept_experts"][str(layer)], report["kept_experts"]
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "prune" / "hf").eval()
        assert hf.config.num_experts == chosen.num_experts
        expected = hf(tokens).logits
    assert max_rel_err(_logits_of(tmp_path / "prune" / "ckpt", tokens), expected) < 1e-5


def test_moe_training_at_tp2_without_sequence_parallel_is_refused(kd_moe, tmp_path):
    from minitron_nemo.distill.train import train
    from minitron_nemo.errors import MinitronError

    root, data = kd_moe
    with pytest.raises(MinitronError, match=r"MoE model at tp = 2 needs parallel.sequence_par"):
        train(root / "student", tmp_path / "run", _moe_cfg(), data, root / "teacher", tp=2)
    assert not (tmp_path / "run" / "checkpoints").exists()
