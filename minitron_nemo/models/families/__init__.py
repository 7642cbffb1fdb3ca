"""HF model families: one declarative module each, registered by `architectures` name."""

from minitron_nemo.models.families import (  # noqa: F401  (registration)
    llama,
    mistral,
    mixtral,
    qwen2,
    qwen2_moe,
    qwen3,
)
from minitron_nemo.models.families.base import (
    REGISTRY,
    Family,
    Rule,
    family_by_name,
    family_for_config,
)

__all__ = ["REGISTRY", "Family", "Rule", "family_by_name", "family_for_config"]
