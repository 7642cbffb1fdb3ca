"""Qwen3 (dense) and Qwen3-MoE: per-head q/k RMSNorm, head_dim independent of hidden / heads.

Qwen3's q_norm / k_norm ([head_dim], shared by every head) are megatron's per-head
`q_layernorm` / `k_layernorm`: plain copies, never split over TP, untouched by head pruning.
"""

from __future__ import annotations

from typing import Any

from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.families.base import Rule, register
from minitron_nemo.models.families.llama import LLAMA_CONFIG_KEYS, LlamaLike

QWEN3_CONFIG_KEYS = (LLAMA_CONFIG_KEYS - {"mlp_bias"}) | {
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
}
MOE_CONFIG_KEYS = frozenset(
    {
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "decoder_sparse_step",
        "mlp_only_layers",
        "norm_topk_prob",
        "router_aux_loss_coef",
        "output_router_logits",
    }
)


def qwen_moe_layers(raw: dict[str, Any], num_layers: int, source: str) -> list[int]:
    """MoE layer indices of a Qwen-MoE config: not in mlp_only_layers and (i + 1) a multiple
    of decoder_sparse_step (transformers' rule)."""
    step = int(raw.get("decoder_sparse_step", 1) or 1)
    dense = set(raw.get("mlp_only_layers") or [])
    bad = sorted(i for i in dense if not 0 <= i < num_layers)
    if bad:
        raise MinitronError(f"{source}: mlp_only_layers {bad} outside 0..{num_layers - 1}")
    return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]


def expert_rules(experts: str, router: str, gate: str, up: str, down: str) -> list[Rule]:
    """Router + per-expert gated MLP rules of one MoE layer; `experts` is the HF prefix of
    expert <e> (e.g. `model.layers.*.mlp.experts.<e>.`)."""
    mc = "decoder.layers.*.mlp."
    return [
        Rule(mc + "router.weight", (router,), "copy", "moe"),
        Rule(
            mc + "experts.local_experts.<e>.linear_fc1.weight",
            (experts + gate, experts + up),
            "gate_up",
            "moe",
        ),
        Rule(mc + "experts.local_experts.<e>.linear_fc2.weight", (experts + down,), "copy", "moe"),
    ]


class QwenMoeMixin:
    """Config translation shared by Qwen3-MoE and Qwen2-MoE."""

    name: str

    def moe_fields(self, raw: dict[str, Any], source: str) -> dict[str, Any]:
        experts = raw.get("num_experts", raw.get("num_local_experts"))
        required = {
            "num_experts": experts,
            "num_experts_per_tok": raw.get("num_experts_per_tok"),
            "moe_intermediate_size": raw.get("moe_intermediate_size"),
        }
        for key, value in required.items():
            if not value:
                raise MinitronError(
                    f"{source}: missing required key {key!r} of a {self.name} model"
                )
        moe_layers = qwen_moe_layers(raw, raw["num_hidden_layers"], source)
        return dict(
            num_experts=experts,
            moe_ffn_hidden_size=raw["moe_intermediate_size"],
            moe_router_topk=raw["num_experts_per_tok"],
            moe_norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            moe_layers=moe_layers,
            **self.shared_expert_fields(raw),
        )

    def shared_expert_fields(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {}

    def moe_config_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        moe = set(range(arch.num_layers)) if arch.moe_layers is None else set(arch.moe_layers)
        return {
            "num_experts": arch.num_experts,
            "num_experts_per_tok": arch.moe_router_topk,
            "moe_intermediate_size": arch.moe_ffn_hidden_size,
            "norm_topk_prob": arch.moe_norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(arch.num_layers) if i not in moe],
        }


@register
class Qwen3(LlamaLike):
    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_type = "qwen3"
    config_keys = QWEN3_CONFIG_KEYS
    required_values = {"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False}
    qk_layernorm = True
    extra_keys = ("sliding_window", "max_window_layers")


@register
class Qwen3Moe(QwenMoeMixin, Qwen3):
    name = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    model_type = "qwen3_moe"
    config_keys = QWEN3_CONFIG_KEYS | MOE_CONFIG_KEYS
    extra_keys = ("sliding_window", "max_window_layers", "router_aux_loss_coef")

    def moe_rules(self, arch: ModelArch) -> list[Rule]:
        mlp = "model.layers.*.mlp."
        return expert_rules(
            mlp + "experts.<e>.", mlp + "gate.weight", "gate_proj.weight", "up_proj.weight",
            "down_proj.weight",
        )  # fmt: skip
