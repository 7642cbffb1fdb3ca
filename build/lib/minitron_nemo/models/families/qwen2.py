"""Qwen2 / Qwen2.5 (bias on q, k and v; head_dim = hidden / heads)."""

from __future__ import annotations

from minitron_nemo.models.families.base import register
from minitron_nemo.models.families.llama import LLAMA_CONFIG_KEYS, LlamaLike


@register
class Qwen2(LlamaLike):
    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    model_type = "qwen2"
    config_keys = (LLAMA_CONFIG_KEYS - {"attention_bias", "mlp_bias", "head_dim"}) | {
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "layer_types",
    }
    required_values = {"hidden_act": "silu", "use_sliding_window": False}
    qkv_bias = True
    has_head_dim = False
    extra_keys = ("sliding_window", "max_window_layers")
