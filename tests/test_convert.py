"""HF <-> megatron conversion of every family (dense, Qwen3, MoE): logit parity at TP=1/TP=2/PP=2
(and EP=2 for MoE), bit-exact round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minitron_nemo.checkpoint import load_model
from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from minitron_nemo.convert.mcore_to_hf import mcore_to_hf
from minitron_nemo.runtime import distributed
from minitron_nemo.runtime.forward import forward_logits
from tests.helpers import (
    MOE_CONFIGS,
    REPO,
    TINY_CONFIGS,
    VOCAB,
    hf_logits,
    make_tiny_hf,
    max_rel_err,
    run_worker,
)

FAMILIES = list(TINY_CONFIGS)
PARITY_TOL = 1e-5


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Per family: HF dir, TP=1 megatron checkpoint, tokens and HF reference logits."""
    root = tmp_path_factory.mktemp("tiny")
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    models = {}
    for i, name in enumerate(FAMILIES):
        hf_dir = make_tiny_hf(name, root / f"{name}_hf", seed=i)
        ckpt = root / f"{name}_mc_tp1"
        hf_to_mcore(hf_dir, ckpt, tp=1, pp=1)
        models[name] = {"hf": hf_dir, "ckpt": ckpt, "ref": hf_logits(hf_dir, tokens)}
    return {"root": root, "tokens": tokens, "models": models}


def _hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(path))
    return state


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_parity_tp1(tiny, family):
    entry = tiny["models"][family]
    with distributed.initialize(tp=1, pp=1):
        model, arch = load_model(entry["ckpt"])
        logits = forward_logits(model, tiny["tokens"])
    assert logits.shape[-1] == arch.padded_vocab_size == 256
    err = max_rel_err(logits[..., :VOCAB], entry["ref"])
    assert err < PARITY_TOL, f"{family}: max rel err {err:.2e}"


def test_parity_test_detects_a_wrong_weight(tiny):
    """The parity check is not vacuous: one perturbed norm weight breaks it."""
    entry = tiny["models"]["llama"]
    with distributed.initialize(tp=1, pp=1):
        model, _ = load_model(entry["ckpt"])
        with torch.no_grad():
            model.decoder.layers[1].pre_mlp_layernorm.weight[3] += 0.05
        logits = forward_logits(model, tiny["tokens"])
    assert max_rel_err(logits[..., :VOCAB], entry["ref"]) > 1e-4


def test_parity_test_detects_a_q_norm_left_at_ones(tiny):
    """A Qwen3 conversion that dropped q_norm (left at its initial ones) is caught."""
    entry = tiny["models"]["qwen3"]
    with distributed.initialize(tp=1, pp=1):
        model, _ = load_model(entry["ckpt"])
        with torch.no_grad():
            model.decoder.layers[0].self_attention.q_layernorm.weight.fill_(1.0)
        logits = forward_logits(model, tiny["tokens"])
    assert max_rel_err(logits[..., :VOCAB], entry["ref"]) > 1e-4


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp,ep", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["tp2", "pp2", "ep2"])
def test_logit_parity_multi_rank(tiny, tp, pp, ep, tmp_path):
    """Checkpoints (saved at TP=1) loaded at TP=2 / PP=2 / EP=2 (MoE models: 2 experts per
    rank, tokens exchanged by the alltoall dispatcher) on separate ranks give HF's logits."""
    torch.save(tiny["tokens"], tmp_path / "tokens.pt")
    families = list(MOE_CONFIGS) if ep > 1 else FAMILIES
    ckpts = [str(tiny["models"][f]["ckpt"]) for f in families]
    run_worker(
        REPO / "tests/dist/logits_worker.py",
        tp * pp * ep,
        str(tp),
        str(pp),
        str(ep),
        str(tmp_path / "tokens.pt"),
        str(tmp_path),
        *ckpts,
    )
    for family in families:
        logits = torch.load(tmp_path / f"{Path(tiny['models'][family]['ckpt']).name}.pt")
        err = max_rel_err(logits, tiny["models"][family]["ref"])
        assert err < PARITY_TOL, f"{family} tp={tp} pp={pp}: max rel err {err:.2e}"


def test_every_family_round_trips_bit_exact_from_tp1(tiny, tmp_path):
    """HF -> mcore (TP=1) -> HF: every tensor identical, names as on disk, for every family."""
    for family, entry in tiny["models"].items():
        mcore_to_hf(entry["ckpt"], tmp_path / family)
        original, exported = _hf_state(entry["hf"]), _hf_state(tmp_path / family)
        assert set(exported) == set(original), family
        assert all(torch.equal(exported[k], v) for k, v in original.items()), family


# Saving at TP=2 splits every kind of parameter: llama (GQA, rope scaling), tied (tied
# embeddings), qwen3 (q/k norms), qwen2_moe (qkv bias; experts over expert-TP, shared expert,
# router and dense layers in one model). mistral and qwen2 add no new split (mistral's tensors
# are llama's, qwen2's are qwen2_moe's dense ones); loading their TP=1 checkpoints at TP=2
# (test_logit_parity_multi_rank) splits them with the same rules.
@pytest.mark.parametrize("family", ["llama", "tied", "qwen3", "qwen2_moe"])
def test_round_trip_tp2_is_bit_exact(tiny, family, tmp_path):
    """HF -> mcore saved at TP=2 -> HF: every tensor and the config identical; and the export
    equals the one of the checkpoint saved at TP=1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    entry = tiny["models"][family]
    hf_to_mcore(entry["hf"], tmp_path / "mc_tp2", tp=2, pp=1)
    mcore_to_hf(tmp_path / "mc_tp2", tmp_path / "hf_from_tp2")
    mcore_to_hf(entry["ckpt"], tmp_path / "hf_from_tp1")

    original = _hf_state(entry["hf"])
    from_tp2 = _hf_state(tmp_path / "hf_from_tp2")
    from_tp1 = _hf_state(tmp_path / "hf_from_tp1")
    assert set(original) == set(from_tp2) == set(from_tp1)
    for name, tensor in original.items():
        assert from_tp2[name].dtype == tensor.dtype
        assert torch.equal(from_tp2[name], tensor), name
        assert torch.equal(from_tp1[name], tensor), name

    def config(path):
        cfg = AutoConfig.from_pretrained(path).to_dict()
        cfg.pop("_name_or_path", None)
        return cfg

    assert config(tmp_path / "hf_from_tp2") == config(entry["hf"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_from_tp2").eval()
    with torch.no_grad():
        assert torch.equal(model(tiny["tokens"]).logits, entry["ref"])


def test_pp2_saved_checkpoint_exports_same_weights(tiny, tmp_path):
    entry = tiny["models"]["tied"]
    hf_to_mcore(entry["hf"], tmp_path / "mc_pp2", tp=1, pp=2)
    mcore_to_hf(tmp_path / "mc_pp2", tmp_path / "hf_out", max_shard_bytes=20_000)
    exported = _hf_state(tmp_path / "hf_out")
    assert (tmp_path / "hf_out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf_out").glob("model-*-of-*.safetensors"))) > 1
    original = _hf_state(entry["hf"])
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_bf16_conversion_round_trips_bf16_weights(tmp_path):
    hf_dir = make_tiny_hf("llama", tmp_path / "hf")
    state = _hf_state(hf_dir)
    from safetensors.torch import save_file

    save_file(
        {k: v.to(torch.bfloat16) for k, v in state.items()}, str(hf_dir / "model.safetensors")
    )
    hf_to_mcore(hf_dir, tmp_path / "mc", dtype="auto")
    mcore_to_hf(tmp_path / "mc", tmp_path / "out")
    exported = _hf_state(tmp_path / "out")
    assert all(exported[k].dtype == torch.bfloat16 for k in exported)
    assert all(torch.equal(exported[k], state[k].to(torch.bfloat16)) for k in state)
