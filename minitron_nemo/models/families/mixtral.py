"""Mixtral: every layer MoE, softmax over the top-k router logits (always renormalised); on disk
`block_sparse_moe.experts.{e}.w1 / w3 / w2` (gate / up / down) and `block_sparse_moe.gate`."""

from __future__ import annotations

from typing import Any

from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.families.base import Rule, register
from minitron_nemo.models.families.llama import LLAMA_CONFIG_KEYS, LlamaLike
from minitron_nemo.models.families.qwen3 import expert_rules


@register
class Mixtral(LlamaLike):
    name = "mixtral"
    architectures = ("MixtralForCausalLM",)
    model_type = "mixtral"
    config_keys = (LLAMA_CONFIG_KEYS - {"attention_bias", "mlp_bias"}) | {
        "sliding_window",
        "num_local_experts",
        "num_experts_per_tok",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "output_router_logits",
    }
    required_values = {"hidden_act": "silu"}
    extra_keys = ("sliding_window", "router_aux_loss_coef", "router_jitter_noise")

    def moe_fields(self, raw: dict[str, Any], source: str) -> dict[str, Any]:
        for key in ("num_local_experts", "num_experts_per_tok"):
            if not raw.get(key):
                raise MinitronError(f"{source}: missing required key {key!r} of a mixtral model")
        return dict(
            num_experts=raw["num_local_experts"],
            moe_ffn_hidden_size=raw["intermediate_size"],
            moe_router_topk=raw["num_experts_per_tok"],
            moe_norm_topk_prob=True,
        )

    def moe_config_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        if arch.moe_layers is not None or not arch.moe_norm_topk_prob:
            raise MinitronError("mixtral cannot represent dense layers or unnormalised top-k")
        return {
            "num_local_experts": arch.num_experts,
            "num_experts_per_tok": arch.moe_router_topk,
            "intermediate_size": arch.moe_ffn_hidden_size,
        }

    def moe_rules(self, arch: ModelArch) -> list[Rule]:
        moe = "model.layers.*.block_sparse_moe."
        return expert_rules(
            moe + "experts.<e>.", moe + "gate.weight", "w1.weight", "w3.weight", "w2.weight"
        )
