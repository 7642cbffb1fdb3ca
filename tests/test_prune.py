"""Structured pruning: identity at source sizes, planted importance vs hand slicing, TP/PP
invariance, reuse of a saved importance file, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minitron_nemo.checkpoint import load_model
from minitron_nemo.config import PruneConfig
from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from minitron_nemo.errors import MinitronError
from minitron_nemo.prune.stage import run_prune
from minitron_nemo.runtime import distributed
from minitron_nemo.runtime.forward import forward_logits
from tests.helpers import VOCAB, make_tiny_hf, max_rel_err, random_documents, token_data_spec

TOKENS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """calib(seed) -> data whose calibration set is 14 samples of 17 random tokens."""
    root = tmp_path_factory.mktemp("calib")
    made = {}

    def make(seed: int = 0):
        if seed not in made:
            docs = random_documents(20, 17, seed=seed)
            made[seed] = token_data_spec(
                root / f"seed{seed}", docs, seq_length=16, calibration_samples=14
            )
        return made[seed]

    return make


def _state(hf_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(hf_dir / "model.safetensors")


def _logits(ckpt: Path) -> torch.Tensor:
    return _logits_of(ckpt, TOKENS)


def _logits_of(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    with distributed.initialize(tp=1, pp=1):
        model, arch = load_model(ckpt)
        return forward_logits(model, tokens)[..., : arch.vocab_size]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_src")
    hf = make_tiny_hf("llama", root / "hf", seed=3)
    hf_to_mcore(hf, root / "mc")
    return {"hf": hf, "mc": root / "mc", "root": root}


def test_pruning_to_own_sizes_is_identity(source, tmp_path, calib):
    cfg = PruneConfig(depth_eval_samples=4, micro_batch_size=2)
    run_prune(source["mc"], tmp_path / "out", cfg, calib())
    before, after = _state(source["hf"]), _state(tmp_path / "out" / "hf")
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(tmp_path / "out" / "ckpt"), _logits(source["mc"]))


# -- planted importance ------------------------------------------------------------------
LOW_CHANNELS = list(range(3, 64, 4))  # 16 of 64
LOW_NEURONS = {i: sorted({(7 * j + i) % 96 for j in range(32)}) for i in range(4)}  # 32 of 96
IDENTITY_LAYER = 2


def _plant(hf_dir: Path) -> None:
    """Scale weights so the unimportant units are known in advance."""
    state = _state(hf_dir)
    small = 0.01
    c = torch.tensor(LOW_CHANNELS)
    state["model.embed_tokens.weight"][:, c] *= small
    for i in range(4):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[p + norm + ".weight"][c] *= small
        state[p + "self_attn.o_proj.weight"][c] *= small
        state[p + "mlp.down_proj.weight"][c] *= small
        n = torch.tensor(LOW_NEURONS[i])
        state[p + "mlp.gate_proj.weight"][n] *= small
        state[p + "mlp.up_proj.weight"][n] *= small
        state[p + "self_attn.v_proj.weight"][24:] *= small  # group 1 (heads 2, 3) is quiet
    p = f"model.layers.{IDENTITY_LAYER}."
    state[p + "self_attn.o_proj.weight"].zero_()
    state[p + "mlp.down_proj.weight"].zero_()
    save_file(state, str(hf_dir / "model.safetensors"))


def _hand_sliced_hf_logits(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """An HF model with the pruned config and weights sliced by hand, written independently."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config

    keep_c = [c for c in range(64) if c not in LOW_CHANNELS]
    layers = [i for i in range(4) if i != IDENTITY_LAYER]
    config = tiny_config(
        "llama",
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    new = {
        "model.embed_tokens.weight": state["model.embed_tokens.weight"][:, keep_c],
        "model.norm.weight": state["model.norm.weight"][keep_c],
        "lm_head.weight": state["lm_head.weight"][:, keep_c],
    }
    for j, i in enumerate(layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{j}."
        keep_n = [n for n in range(96) if n not in LOW_NEURONS[i]]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            new[dst + norm + ".weight"] = state[src + norm + ".weight"][keep_c]
        new[dst + "self_attn.q_proj.weight"] = state[src + "self_attn.q_proj.weight"][:48][
            :, keep_c
        ]
        new[dst + "self_attn.k_proj.weight"] = state[src + "self_attn.k_proj.weight"][:24][
            :, keep_c
        ]
        new[dst + "self_attn.v_proj.weight"] = state[src + "self_attn.v_proj.weight"][:24][
            :, keep_c
        ]
        new[dst + "self_attn.o_proj.weight"] = state[src + "self_attn.o_proj.weight"][keep_c][
            :, :48
        ]
        new[dst + "mlp.gate_proj.weight"] = state[src + "mlp.gate_proj.weight"][keep_n][:, keep_c]
        new[dst + "mlp.up_proj.weight"] = state[src + "mlp.up_proj.weight"][keep_n][:, keep_c]
        new[dst + "mlp.down_proj.weight"] = state[src + "mlp.down_proj.weight"][keep_c][:, keep_n]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(new, strict=True)
    with torch.no_grad():
        return model(TOKENS).logits


def test_planted_importance_prunes_the_planted_units(tmp_path, calib):
    hf = make_tiny_hf("llama", tmp_path / "hf", seed=5)
    _plant(hf)
    hf_to_mcore(hf, tmp_path / "mc")
    cfg = PruneConfig(
        hidden_size=48,
        ffn_hidden_size=64,
        num_attention_heads=2,
        num_query_groups=1,
        num_layers=3,
        depth_method="block_importance",
        depth_eval_samples=4,
        micro_batch_size=2,
    )
    report = run_prune(tmp_path / "mc", tmp_path / "out", cfg, calib())
    assert report["dropped_layers"] == [IDENTITY_LAYER]
    assert report["block_importance"][IDENTITY_LAYER] == pytest.approx(0.0, abs=1e-12)
    imp = torch.load(tmp_path / "out" / "importance.pt", weights_only=False)
    low_c = set(torch.sort(imp["channels"]).indices[:16].tolist())
    assert low_c == set(LOW_CHANNELS)
    for i in range(4):
        assert set(torch.sort(imp["neurons"][i]).indices[:32].tolist()) == set(LOW_NEURONS[i])
    pruned = _logits(tmp_path / "out" / "ckpt")
    expected = _hand_sliced_hf_logits(_state(hf))
    assert max_rel_err(pruned, expected) < 1e-5


QUIET_HEADS = (1, 2)  # one per query group: group 0 = heads 0, 1; group 1 = heads 2, 3


def test_planted_quiet_head_in_each_group_is_removed(tmp_path, calib):
    """A head whose output barely reaches the residual stream (o_proj columns x 0.01) is the one
    removed from its group. Its output (the input of o_proj, what P1's activation score
    measures) is untouched by the planting, so only a score that sees what the head does to the
    loss (taylor) can find it."""
    hf = make_tiny_hf("llama", tmp_path / "hf", seed=6)
    state = _state(hf)
    for i in range(4):
        o = state[f"model.layers.{i}.self_attn.o_proj.weight"].view(64, 4, 24)
        o[:, list(QUIET_HEADS)] *= 0.01
    save_file(state, str(hf / "model.safetensors"))
    hf_to_mcore(hf, tmp_path / "mc")
    cfg = PruneConfig(num_attention_heads=2, depth_scores=False, depth_eval_samples=4,
                      micro_batch_size=2)  # fmt: skip
    report = run_prune(tmp_path / "mc", tmp_path / "out", cfg, calib())
    assert report["head_score"] == "taylor"
    imp = torch.load(tmp_path / "out" / "importance.pt", weights_only=False)
    for i in range(4):
        low = imp["heads_taylor"][i].view(2, 2).argmin(1) + torch.tensor([0, 2])
        assert set(low.tolist()) == set(QUIET_HEADS), imp["heads_taylor"][i]
    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config

    keep = [h for h in range(4) if h not in QUIET_HEADS]
    new = {k: v for k, v in state.items() if "q_proj" not in k and "o_proj" not in k}
    for i in range(4):
        p = f"model.layers.{i}.self_attn."
        new[p + "q_proj.weight"] = state[p + "q_proj.weight"].view(4, 24, 64)[keep].reshape(48, 64)
        new[p + "o_proj.weight"] = (
            state[p + "o_proj.weight"].view(64, 4, 24)[:, keep].reshape(64, 48)
        )
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", num_attention_heads=2, num_key_value_heads=2), dtype=torch.float32
    ).eval()
    model.load_state_dict(new, strict=False)
    with torch.no_grad():
        expected = model(TOKENS).logits
    assert max_rel_err(_logits(tmp_path / "out" / "ckpt"), expected) < 1e-5


def test_reprune_from_saved_importance_equals_recalibrating(source, tmp_path, calib):
    first = PruneConfig(ffn_hidden_size=48, depth_scores=False, depth_eval_samples=4)
    run_prune(source["mc"], tmp_path / "a", first, calib(seed=0))
    second = dict(hidden_size=40, num_attention_heads=2, depth_scores=False, depth_eval_samples=4)
    reused = PruneConfig(**second, importance=str(tmp_path / "a" / "importance.pt"))
    # Different calibration data: equal results prove the file was read, not recomputed.
    run_prune(source["mc"], tmp_path / "b", reused, calib(seed=99))
    run_prune(source["mc"], tmp_path / "c", PruneConfig(**second), calib(seed=0))
    b, c = _state(tmp_path / "b" / "hf"), _state(tmp_path / "c" / "hf")
    assert set(b) == set(c) and all(torch.equal(b[k], c[k]) for k in b)


LAYOUTS = [(1, 1), (2, 1), (1, 2)]
"""(TP, PP) layouts at which the same prune is run (one process, two TP ranks, two stages)."""


@pytest.fixture(scope="module")
def layout_prunes(source, calib, tmp_path_factory):
    """The same width + depth prune (merged heads) at each of LAYOUTS, once per module: (tp,
    pp) -> (output directory, report, importance). Read by the two tests below."""
    cfg = PruneConfig(
        hidden_size=48,
        ffn_hidden_size=64,
        num_attention_heads=2,
        num_layers=2,
        merge_pruned_heads=True,
        depth_eval_samples=4,
        micro_batch_size=2,
    )
    root = tmp_path_factory.mktemp("layout_prunes")
    results = {}
    for tp, pp in LAYOUTS:
        out = root / f"tp{tp}pp{pp}"
        report = run_prune(source["mc"], out, cfg, calib(), tp=tp, pp=pp)
        results[(tp, pp)] = (out, report, torch.load(out / "importance.pt", weights_only=False))
    return results


@pytest.mark.dist
def test_tp2_and_pp2_prune_like_tp1(layout_prunes):
    _, ref_report, ref_imp = layout_prunes[(1, 1)]
    ref_state = _state(layout_prunes[(1, 1)][0] / "hf")
    # TP=2 sums row-parallel partial products in another order than TP=1, so activations (and
    # importance) differ in the last bits; the ranking, hence every pruned weight, is identical.
    for layout in [(2, 1), (1, 2)]:
        out, report, imp = layout_prunes[layout]
        state = _state(out / "hf")
        assert report["dropped_layers"] == ref_report["dropped_layers"]
        for key in ("heads", "neurons", "channels", "block_importance"):
            torch.testing.assert_close(imp[key], ref_imp[key], rtol=1e-6, atol=0)
        assert set(state) == set(ref_state)
        assert all(torch.equal(state[k], ref_state[k]) for k in state), layout
    # PP only moves activations between stages: its importance is bitwise identical.
    for key in ("heads", "neurons", "channels", "block_importance"):
        assert torch.equal(layout_prunes[(1, 2)][2][key], ref_imp[key]), key


@pytest.mark.parametrize(
    "targets,tp,match",
    [
        (
            dict(ffn_hidden_size=51),
            2,
            r"prune target: tensor parallel size 2 does not divide arch\.ffn_hidden_size = 51",
        ),
        (
            dict(num_attention_heads=3),
            1,
            r"num_attention_heads = 3 is not a multiple of num_query_groups = 2",
        ),
        (
            dict(ffn_hidden_size=200),
            1,
            r"prune\.ffn_hidden_size = 200 is larger than the source's 96",
        ),
        (
            dict(num_query_groups=1),
            1,
            r"2 heads per query group exceeds|4 heads per query group exceeds",
        ),
        (dict(drop_layers=[1, 9]), 1, r"prune\.drop_layers: expected distinct indices in 0\.\.3"),
    ],
    ids=["tp", "heads-groups", "larger", "per-group", "drop-layers"],
)
def test_impossible_targets_are_refused_before_work(source, tmp_path, targets, tp, match, calib):
    with pytest.raises(MinitronError, match=match):
        run_prune(source["mc"], tmp_path / "out", PruneConfig(**targets), calib(), tp=tp)
    assert not (tmp_path / "out").exists()


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=["tp1", "tp2", "pp2"])
def test_shard_local_pruning_equals_the_whole_model_round_trip(
    source, layout_prunes, tmp_path, tp, pp
):
    """The pruned checkpoint sliced on the shards equals, bit for bit, the old path: slice the
    whole HF state in one process, write it as an HF directory, convert at the same TP/PP."""
    from minitron_nemo.convert.mcore_to_hf import write_hf_config
    from minitron_nemo.models.arch import ModelArch
    from minitron_nemo.prune.select import select
    from minitron_nemo.prune.slice import slice_state_dict

    new_dir, report, imp = layout_prunes[(tp, pp)]
    src_arch = ModelArch.load(source["mc"] / "arch.yaml")
    arch = ModelArch.load(new_dir / "ckpt" / "arch.yaml")
    plan = select(
        src_arch, arch, imp["heads"], imp["neurons"], imp["channels"], report["kept_layers"]
    )
    sliced = slice_state_dict(_state(source["hf"]), src_arch, plan, imp["heads"], True)
    old_hf = tmp_path / "old_hf"
    old_hf.mkdir()
    save_file(sliced, old_hf / "model.safetensors")
    write_hf_config(arch, torch.float32, old_hf)
    hf_to_mcore(old_hf, tmp_path / "old", tp=tp, pp=pp)
    with distributed.initialize(tp=1, pp=1):
        new_model, _ = load_model(new_dir / "ckpt")
        old_model, _ = load_model(tmp_path / "old")
        new, old = new_model.state_dict(), old_model.state_dict()
        keys = [k for k in old if "extra_state" not in k]
        assert keys and all(torch.equal(new[k], old[k]) for k in keys)
    assert len(report["dropped_layers"]) == 2 and arch.num_layers == 2
    exported = _state(new_dir / "hf")  # the streamed HF copy of the new checkpoint
    assert set(exported) == set(sliced) and all(torch.equal(exported[k], sliced[k]) for k in sliced)


def test_qwen3_prunes_on_every_axis_and_loads_in_transformers(tmp_path, calib):
    """Qwen3 (per-head q/k norms, head_dim 24 != hidden / heads) pruned in hidden, ffn, heads,
    query groups and depth: transformers loads the export and gives the pruned checkpoint's
    logits; q_norm / k_norm are the kept layers' own, untouched."""
    from transformers import AutoModelForCausalLM

    hf = make_tiny_hf("qwen3", tmp_path / "hf", seed=4)
    hf_to_mcore(hf, tmp_path / "mc")
    cfg = PruneConfig(
        hidden_size=48,
        ffn_hidden_size=64,
        num_attention_heads=2,
        num_query_groups=1,
        num_layers=3,
        depth_eval_samples=4,
        micro_batch_size=2,
    )
    report = run_prune(tmp_path / "mc", tmp_path / "out", cfg, calib())
    pruned, source = _state(tmp_path / "out" / "hf"), _state(hf)
    for j, i in enumerate(report["kept_layers"]):
        for norm in ("q_norm", "k_norm"):
            name = f"self_attn.{norm}.weight"
            assert torch.equal(
                pruned[f"model.layers.{j}.{name}"], source[f"model.layers.{i}.{name}"]
            )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf").eval()
    assert (model.config.hidden_size, model.config.num_key_value_heads) == (48, 1)
    with torch.no_grad():
        expected = model(TOKENS).logits
    assert max_rel_err(_logits(tmp_path / "out" / "ckpt"), expected) < 1e-5


@pytest.mark.dist
def test_moe_prunes_every_axis_at_tp1_and_tp2(tmp_path, calib):
    """Qwen2-MoE (shared expert with its gate, layer 1 a dense MLP) pruned in hidden, heads,
    dense ffn, depth, expert count (4 -> 3), expert width (32 -> 16) and shared-expert width
    (48 -> 24): the router and every expert follow, the kept layers keep their kind,
    transformers loads the export with the pruned checkpoint's logits, and TP=2 (experts split
    over expert-TP) and EP=2 (two experts per rank, calibration samples split over the ranks)
    give bitwise the same pruned weights as TP=1."""
    from transformers import AutoModelForCausalLM

    hf = make_tiny_hf("qwen2_moe", tmp_path / "hf", seed=6)
    hf_to_mcore(hf, tmp_path / "mc")
    cfg = PruneConfig(
        hidden_size=48,
        ffn_hidden_size=64,
        num_attention_heads=2,
        num_layers=3,
        num_moe_experts=3,
        moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=24,
        depth_method="block_importance",
        depth_scores=False,
        depth_eval_samples=4,
        micro_batch_size=2,
    )
    states = {}
    for tp, ep in ((1, 1), (2, 1), (1, 2)):
        report = run_prune(tmp_path / "mc", tmp_path / f"tp{tp}ep{ep}", cfg, calib(), tp=tp, ep=ep)
        states[tp, ep] = _state(tmp_path / f"tp{tp}ep{ep}" / "hf")
    for layout in ((2, 1), (1, 2)):
        assert set(states[layout]) == set(states[1, 1]), layout
        assert all(torch.equal(states[1, 1][k], states[layout][k]) for k in states[1, 1]), layout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tp1ep1" / "hf").eval()
    moe_kept = [j for j, i in enumerate(report["kept_layers"]) if i != 1]
    assert model.config.mlp_only_layers == [j for j in range(3) if j not in moe_kept]
    assert states[1, 1]["model.layers.0.mlp.experts.2.down_proj.weight"].shape == (48, 16)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" not in states[1, 1]
    assert states[1, 1]["model.layers.0.mlp.gate.weight"].shape == (3, 48)
    assert states[1, 1]["model.layers.0.mlp.shared_expert.up_proj.weight"].shape == (24, 48)
    with torch.no_grad():
        expected = model(TOKENS).logits
    assert max_rel_err(_logits(tmp_path / "tp1ep1" / "ckpt"), expected) < 1e-5


def test_moe_targets_that_cannot_apply_are_refused(tmp_path, calib):
    hf = make_tiny_hf("mixtral", tmp_path / "hf")
    hf_to_mcore(hf, tmp_path / "mc")
    with pytest.raises(MinitronError, match=r"mixtral model has no dense MLP layers"):
        run_prune(tmp_path / "mc", tmp_path / "out", PruneConfig(ffn_hidden_size=48), calib())
    assert not (tmp_path / "out").exists()
