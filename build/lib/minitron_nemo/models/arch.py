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
        if self.padded_vocab_size < self.vocab_size:
            raise MinitronError(
                f"arch.padded_vocab_size ({self.padded_vocab_size}) < vocab_size "
                f"({self.vocab_size})"
            )

    def check_parallel(self, tp: int, pp: int) -> None:
        """Refuse a TP/PP layout this architecture cannot be split into (one clear line)."""
        checks = {
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "ffn_hidden_size": self.ffn_hidden_size,
            "padded_vocab_size": self.padded_vocab_size,
        }
        for name, value in checks.items():
            if value % tp:
                raise MinitronError(
                    f"tensor parallel size {tp} does not divide arch.{name} = {value}"
                )
        if self.num_layers % pp:
            raise MinitronError(
                f"pipeline parallel size {pp} does not divide arch.num_layers = {self.num_layers}"
            )

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count of the HF model this describes (real vocab, no padding)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        total = self.num_layers * per_layer + h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return total

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
