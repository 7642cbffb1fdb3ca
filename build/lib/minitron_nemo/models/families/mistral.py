"""Mistral (decoupled head_dim, e.g. Mistral-NeMo-12B: hidden 5120, 32 heads x 128)."""

from __future__ import annotations

from minitron_nemo.models.families.base import register
from minitron_nemo.models.families.llama import LLAMA_CONFIG_KEYS, LlamaLike


@register
class Mistral(LlamaLike):
    # Attention here is full causal; sliding_window is kept for export and only changes
    # results for sequences longer than the window.
    name = "mistral"
    architectures = ("MistralForCausalLM",)
    model_type = "mistral"
    config_keys = (LLAMA_CONFIG_KEYS - {"attention_bias", "mlp_bias"}) | {"sliding_window"}
    required_values = {"hidden_act": "silu"}
    extra_keys = ("sliding_window",)
