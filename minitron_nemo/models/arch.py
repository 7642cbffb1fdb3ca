"""The architecture of a decoder-only LLM in our own terms (written to `arch.yaml`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minitron_nemo.errors import MinitronError

DEFAULT_VOCAB_PAD_MULTIPLE = 128


def pad_vocab(vocab_size: int, multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE) -> int:
    """Round the vocabulary up to a multiple (megatron pads the embedding table)."""
    return -(-vocab_size // multiple) * multiple


@dataclass
class ModelArch:
    """A Llama-like decoder: RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention."""

    family: str
    """HF family the weights come from and go back to (a key of `families.REGISTRY`)."""
    vocab_size: int
    """Real vocabulary size (the HF embedding rows)."""
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    """Number of key/value heads (GQA groups)."""
    head_dim: int
    """Channels per attention head (megatron `kv_channels`); may differ from hidden/heads."""
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    padded_vocab_size: int = 0
    """Embedding rows in megatron (vocab rounded up; extra rows are stripped at export)."""
    rope_scaling: dict[str, float] | None = None
    """Llama-3 rope scaling: factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings. None for plain rotary."""
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    """Per-head RMSNorm of queries and keys ([head_dim] weights, Qwen3); megatron's
    `q_layernorm` / `k_layernorm`."""
    num_experts: int = 0
    """Routed experts per MoE layer (0 = a dense model)."""
    moe_ffn_hidden_size: int = 0
    """Hidden size of one routed expert's MLP."""
    moe_router_topk: int = 0
    """Experts each token is routed to."""
    moe_norm_topk_prob: bool = True
    """Top-k probabilities renormalised to sum to 1 (softmax over the k picked logits);
    False: softmax over all experts, then top-k (Qwen-MoE's norm_topk_prob false)."""
    moe_shared_expert_size: int = 0
    """Hidden size of the shared expert every token goes through (0 = none; Qwen2-MoE)."""
    moe_shared_expert_gate: bool = False
    """The shared expert's output is scaled by sigmoid(x . w) (Qwen2-MoE)."""
    moe_layers: list[int] | None = None
    """Indices of the MoE layers (the others are dense MLPs of ffn_hidden_size); None = every
    layer when num_experts > 0."""
    hf_extra: dict[str, Any] = field(default_factory=dict)
    """HF config entries that do not shape the model but are kept for export (token ids...)."""

    def __post_init__(self) -> None:
        if not self.padded_vocab_size:
            self.padded_vocab_size = pad_vocab(self.vocab_size)
        for name in (
            "vocab_size",
            "hidden_size",
            "ffn_hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_query_groups",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise MinitronError(f"arch.{name}: expected a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise MinitronError(
                f"arch.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"arch.num_query_groups ({self.num_query_groups})"
            )
        if self.num_experts:
            for name in ("moe_ffn_hidden_size", "moe_router_topk"):
                value = getattr(self, name)
                if not isinstance(value, int) or value <= 0:
                    raise MinitronError(
                        f"arch.{name}: expected a positive integer for an MoE model, got {value!r}"
                    )
            if self.moe_router_topk > self.num_experts:
                raise MinitronError(
                    f"arch.moe_router_topk ({self.moe_router_topk}) > num_experts "
                    f"({self.num_experts})"
                )
            if self.moe_layers is not None:
                self.moe_layers = sorted(int(i) for i in self.moe_layers)
                bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
                if bad:
                    raise MinitronError(f"arch.moe_layers: {bad} outside 0..{self.num_layers - 1}")
                if self.moe_layers == list(range(self.num_layers)):
                    self.moe_layers = None
        elif self.moe_layers or self.moe_shared_expert_size:
            raise MinitronError("arch.moe_layers / moe_shared_expert_size need num_experts > 0")
        if self.padded_vocab_size < self.vocab_size:
            raise MinitronError(
                f"arch.padded_vocab_size ({self.padded_vocab_size}) < vocab_size "
                f"({self.vocab_size})"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based, global) has routed experts."""
        return self.is_moe and (self.moe_layers is None or layer in self.moe_layers)

    def moe_layer_pattern(self) -> list[int]:
        """megatron's `moe_layer_freq` as a list: 1 = MoE layer, 0 = dense MLP."""
        return [int(self.is_moe_layer(i)) for i in range(self.num_layers)]

    def check_parallel(self, tp: int, pp: int, ep: int = 1) -> None:
        """Refuse a TP/PP/EP layout this architecture cannot be split into (one clear line)."""
        checks = {
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "ffn_hidden_size": self.ffn_hidden_size,
            "padded_vocab_size": self.padded_vocab_size,
        }
        if self.is_moe:
            checks["moe_ffn_hidden_size"] = self.moe_ffn_hidden_size
            if self.moe_shared_expert_size:
                checks["moe_shared_expert_size"] = self.moe_shared_expert_size
        for name, value in checks.items():
            if value % tp:
                raise MinitronError(
                    f"tensor parallel size {tp} does not divide arch.{name} = {value}"
                )
        if self.num_layers % pp:
            raise MinitronError(
                f"pipeline parallel size {pp} does not divide arch.num_layers = {self.num_layers}"
            )
        if ep > 1 and not self.is_moe:
            raise MinitronError(
                f"expert parallel size {ep} needs an MoE model ({self.family} is dense)"
            )
        if self.is_moe and self.num_experts % ep:
            raise MinitronError(
                f"expert parallel size {ep} does not divide arch.num_experts = {self.num_experts}"
            )

    def num_parameters(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count of the HF model this describes (real vocab, no padding).

        `active`: parameters one token goes through (model-card convention: the top-k routed
        experts, the shared expert and the router instead of every expert; embeddings and the
        output layer included when `include_embeddings`)."""
        h = self.hidden_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * self.head_dim if self.qk_layernorm else 0
        dense_mlp = 3 * h * self.ffn_hidden_size
        experts = self.moe_router_topk if active else self.num_experts
        moe_mlp = (
            experts * 3 * h * self.moe_ffn_hidden_size
            + self.num_experts * h  # router
            + 3 * h * self.moe_shared_expert_size
            + (h if self.moe_shared_expert_gate else 0)
        )
        total = h  # final norm
        for layer in range(self.num_layers):
            mlp = moe_mlp if self.is_moe_layer(layer) else dense_mlp
            total += attn + mlp + 2 * h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return total

    def kv_cache_bytes(self, seq_length: int, batch_size: int, bytes_per_value: int = 2) -> int:
        """Keys and values of every layer for `batch_size` sequences of `seq_length` tokens."""
        per_token = 2 * self.num_layers * self.num_query_groups * self.head_dim
        return per_token * seq_length * batch_size * bytes_per_value

    def memory_bytes(self, seq_length: int, batch_size: int, bytes_per_value: int = 2) -> int:
        """Inference memory: every weight (all experts) plus the KV cache, both in
        `bytes_per_value` (2 = bf16); activations and framework overhead not counted."""
        weights = self.num_parameters() * bytes_per_value
        return weights + self.kv_cache_bytes(seq_length, batch_size, bytes_per_value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "arch") -> ModelArch:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MinitronError(f"{source}: unknown field(s) {unknown}; expected {sorted(names)}")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise MinitronError(f"{source}: missing field(s) {missing}")
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> ModelArch:
        if not path.is_file():
            raise MinitronError(f"{path}: not found (expected the arch.yaml of a checkpoint)")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise MinitronError(f"{path}: expected a mapping of architecture fields")
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> ModelArch:
        return dataclasses.replace(self, **changes)
