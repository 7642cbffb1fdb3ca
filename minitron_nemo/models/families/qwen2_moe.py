"""Qwen1.5-MoE / Qwen2-MoE: qkv bias, routed experts plus one shared expert scaled by a sigmoid
gate, dense MLP layers between MoE layers (`decoder_sparse_step`, `mlp_only_layers`)."""

from __future__ import annotations

from typing import Any

from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.families.base import Rule, register
from minitron_nemo.models.families.llama import LLAMA_CONFIG_KEYS, LlamaLike
from minitron_nemo.models.families.qwen3 import MOE_CONFIG_KEYS, QwenMoeMixin, expert_rules


@register
class Qwen2Moe(QwenMoeMixin, LlamaLike):
    name = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    model_type = "qwen2_moe"
    config_keys = (
        (LLAMA_CONFIG_KEYS - {"attention_bias", "mlp_bias"})
        | MOE_CONFIG_KEYS
        | {
            "use_sliding_window",
            "sliding_window",
            "max_window_layers",
            "layer_types",
            "qkv_bias",
            "shared_expert_intermediate_size",
        }
    )
    required_values = {"hidden_act": "silu", "use_sliding_window": False, "qkv_bias": True}
    qkv_bias = True
    extra_keys = ("sliding_window", "max_window_layers", "router_aux_loss_coef")

    def shared_expert_fields(self, raw: dict[str, Any]) -> dict[str, Any]:
        size = int(raw.get("shared_expert_intermediate_size") or 0)
        return {"moe_shared_expert_size": size, "moe_shared_expert_gate": size > 0}

    def moe_config_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        return {
            **super().moe_config_kwargs(arch),
            "shared_expert_intermediate_size": arch.moe_shared_expert_size,
        }

    def moe_rules(self, arch: ModelArch) -> list[Rule]:
        mlp = "model.layers.*.mlp."
        rules = expert_rules(
            mlp + "experts.<e>.", mlp + "gate.weight", "gate_proj.weight", "up_proj.weight",
            "down_proj.weight",
        )  # fmt: skip
        if arch.moe_shared_expert_size:
            shared, mc = mlp + "shared_expert.", "decoder.layers.*.mlp.shared_experts."
            rules += [
                Rule(
                    mc + "linear_fc1.weight",
                    (shared + "gate_proj.weight", shared + "up_proj.weight"),
                    "gate_up",
                    "moe",
                ),
                Rule(mc + "linear_fc2.weight", (shared + "down_proj.weight",), "copy", "moe"),
                Rule(mc + "gate_weight", (mlp + "shared_expert_gate.weight",), "copy", "moe"),
            ]
        return rules
