"""Tiny random HF models of every family, built in the test (no downloads), and launchers."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from minitron_nemo.models.arch import ModelArch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 250  # not a multiple of 128: exercises vocab padding

TINY_CONFIGS = {
    # GQA (4 heads / 2 groups), head_dim 24 != 64 / 4, llama3 rope scaling.
    "llama": dict(
        model_type="llama",
        head_dim=24,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": dict(model_type="mistral", head_dim=24, sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
    # SmolLM2-style: Llama with tied embeddings.
    "tied": dict(model_type="llama", head_dim=16, tie_word_embeddings=True),
    # Per-head q/k RMSNorm, head_dim 24 != 64 / 4.
    "qwen3": dict(model_type="qwen3", head_dim=24),
}
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32, head_dim=24)
MOE_CONFIGS = {
    # Top-k then softmax over the k (norm_topk_prob true), every layer MoE.
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, norm_topk_prob=True, **MOE),
    # Softmax over all experts then top-k, layer 2 a dense MLP.
    "qwen3_moe_nonorm": dict(
        model_type="qwen3_moe", num_experts=4, norm_topk_prob=False, mlp_only_layers=[2], **MOE
    ),
    # Shared expert with its sigmoid gate, qkv bias, layer 1 dense.
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_experts=4,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
        norm_topk_prob=False,
        **MOE,
    ),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, head_dim=24),
}
TINY_CONFIGS.update(MOE_CONFIGS)
DENSE_FAMILIES = [name for name in TINY_CONFIGS if name not in MOE_CONFIGS]


def load_bench(name: str):
    """bench/NAME.py imported as a module (the benches are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(name: str, **overrides):
    from transformers import AutoConfig

    spec = dict(TINY_CONFIGS[name])
    model_type = spec.pop("model_type")
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(spec)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_hf(name: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny model of family `name`; every weight (norms, biases too) is random
    so that a swapped or dropped tensor cannot go unnoticed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(name, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    model.save_pretrained(out)
    return out


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (
        (actual.double() - expected.double()).abs().max() / expected.double().abs().max()
    ).item()


def run_worker(script: Path, nproc: int, *args: str) -> None:
    """Run the worker `script` (a torchrun-style program: env:// rendezvous, gloo) with `args`
        on `nproc` CPU ranks started by our launcher (runtime/launch.py), one process each (one rank
    too). Its ranks are forked from
        the launcher's forkserver: ~0.1 s a launch instead of torchrun's ~7 s of fresh imports on 2
        cores. torchrun itself is tested by tests/test_launch.py. A failing rank raises with its
        traceback."""
    from minitron_nemo.runtime.launch import run_on_ranks

    run_on_ranks(_run_worker_script, nproc, str(script), list(args), own_process=True)


def _run_worker_script(script: str, args: list[str]) -> None:
    import runpy

    from minitron_nemo.runtime.distributed import STORE_PORT_ENV

    # env:// meets at the launcher's store, as torchrun's workers meet at its agent's store
    os.environ.update(MASTER_PORT=os.environ[STORE_PORT_ENV], TORCHELASTIC_USE_AGENT_STORE="True")
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


WORDS = {
    "subject": ["the cat", "a dog", "the old man", "my sister", "the river", "a small bird"],
    "verb": ["sees", "likes", "follows", "finds", "hears", "paints"],
    "object": ["the house", "a red ball", "the tall tree", "some bread", "the moon", "a letter"],
    "tail": ["today.", "at night.", "in the park.", "again.", "with care.", "near the hill."],
}


def synthetic_text(n_sentences: int = 600, seed: int = 0) -> str:
    """English-like sentences from a tiny grammar: structured enough to learn in a few steps."""
    import random

    rng = random.Random(seed)
    sentences = [
        " ".join(rng.choice(WORDS[k]) for k in ("subject", "verb", "object", "tail")).capitalize()
        for _ in range(n_sentences)
    ]
    return "\n".join(" ".join(sentences[i : i + 5]) for i in range(0, n_sentences, 5))


def make_tiny_tokenizer(out: Path, text: str, vocab_size: int = 200):
    """A byte-level BPE tokenizer trained on `text`, saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.save_pretrained(out)
    return fast


def make_tiny_teacher_with_tokenizer(
    out: Path, text: str, seed: int = 0, family: str = "llama"
) -> Path:
    """Tiny random model of `family` + a BPE tokenizer trained on `text`, in one HF directory."""
    tokenizer = make_tiny_tokenizer(out, text)
    make_tiny_hf(
        family,
        out,
        seed=seed,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return out


def write_token_dataset(prefix: Path, documents: list[list[int]], vocab_size: int = VOCAB) -> str:
    """A megatron indexed dataset holding exactly `documents` (no tokenizer involved)."""
    import numpy

    from minitron_nemo.data.indexed import IndexedWriter, token_dtype

    writer = IndexedWriter(prefix, token_dtype(vocab_size))
    lengths = numpy.array([len(d) for d in documents])
    writer.add_documents(numpy.concatenate([numpy.asarray(d) for d in documents]), lengths)
    writer.finalize()
    return str(prefix)


def random_documents(n: int, length: int, vocab_size: int = VOCAB, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=g).tolist() for _ in range(n)]


def token_data_spec(
    root: Path,
    documents: list[list[int]],
    seq_length: int,
    train_samples: int = 0,
    split: str = "1,0,0",
    heldout_samples: int = 0,
    calibration_samples: int = 1,
    vocab_size: int = VOCAB,
):
    """Write `documents` as an indexed dataset under `root`, build megatron's indices of every
    view with samples and return the DataSpec that ranks read it with."""
    from minitron_nemo.data.datasets import DataSpec, build_indices

    prefix = write_token_dataset(root / "tokens", documents, vocab_size)
    spec = DataSpec(
        prefixes=(prefix,),
        weights=(1.0,),
        split=split,
        seq_length=seq_length,
        seed=0,
        cache_dir=str(root / "cache"),
        vocab_size=vocab_size,
        eod=vocab_size - 1,
        train_samples=train_samples,
        heldout_samples=heldout_samples,
        calibration_samples=calibration_samples,
    )
    build_indices(spec, ("train", "calibration", "test"))
    return spec


def make_kd_models(root: Path) -> Path:
    """A tiny teacher (4 layers) and a smaller student (2 layers, ffn 64) as megatron
    checkpoints root/teacher and root/student."""
    from minitron_nemo.convert.hf_to_mcore import hf_to_mcore

    make_tiny_hf("llama", root / "teacher_hf", seed=1)
    hf_to_mcore(root / "teacher_hf", root / "teacher")
    make_tiny_hf("llama", root / "student_hf", seed=2, intermediate_size=64, num_hidden_layers=2)
    hf_to_mcore(root / "student_hf", root / "student")
    return root


# -- real models' configs (config.json as published), for counts from the config alone ---
def arch_from_config(config: dict) -> ModelArch:
    """The ModelArch of an HF config dict (a model card's config.json)."""
    from minitron_nemo.models.families import family_for_config

    return family_for_config(config, "card").arch_from_config(config, "card")


QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "tie_word_embeddings": False,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "use_sliding_window": False,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}
