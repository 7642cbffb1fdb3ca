"""Llama 2 / 3 / 3.1 / 3.2 (and tied-embedding Llamas such as SmolLM2)."""

from __future__ import annotations

from typing import Any, ClassVar

from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.families.base import EXTRA_KEYS, Family, Rule, register

LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def parse_rope(raw: dict[str, Any], source: str) -> tuple[float, dict[str, float] | None]:
    """(theta, llama3 scaling or None) from either transformers-4 or -5 style config keys."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_ROPE_KEYS if k not in params]
        if missing:
            raise MinitronError(f"{source}: llama3 rope scaling lacks {missing}")
        return theta, {k: params[k] for k in LLAMA3_ROPE_KEYS}
    raise MinitronError(
        f"{source}: rope_type {rope_type!r} is not supported (supported: default, llama3)"
    )


def rope_parameters(arch: ModelArch) -> dict[str, Any]:
    if arch.rope_scaling:
        return {"rope_type": "llama3", "rope_theta": arch.rope_theta, **arch.rope_scaling}
    return {"rope_type": "default", "rope_theta": arch.rope_theta}


class LlamaLike(Family):
    """Shared map of the Llama-style families (RMSNorm, SwiGLU, rotary, GQA)."""

    qkv_bias: ClassVar[bool] = False
    has_head_dim: ClassVar[bool] = True
    qk_layernorm: ClassVar[bool] = False
    extra_keys: ClassVar[tuple[str, ...]] = ()

    def rules(self, arch: ModelArch) -> list[Rule]:
        layer = "model.layers.*."
        attn = layer + "self_attn."
        rules = [
            Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
            Rule("decoder.layers.*.input_layernorm.weight", (layer + "input_layernorm.weight",)),
            Rule(
                "decoder.layers.*.self_attention.linear_qkv.weight",
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                "qkv",
            ),
            Rule("decoder.layers.*.self_attention.linear_proj.weight", (attn + "o_proj.weight",)),
            Rule(
                "decoder.layers.*.pre_mlp_layernorm.weight",
                (layer + "post_attention_layernorm.weight",),
            ),
            *self.dense_mlp_rules(),
            *(self.moe_rules(arch) if arch.is_moe else []),
            Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
        ]
        if arch.qkv_bias:
            rules.append(
                Rule(
                    "decoder.layers.*.self_attention.linear_qkv.bias",
                    (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
                    "qkv",
                )
            )
        if arch.qk_layernorm:
            rules += [
                Rule(
                    "decoder.layers.*.self_attention.q_layernorm.weight", (attn + "q_norm.weight",)
                ),
                Rule(
                    "decoder.layers.*.self_attention.k_layernorm.weight", (attn + "k_norm.weight",)
                ),
            ]
        if not arch.tie_embeddings:
            rules.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
        return rules

    @staticmethod
    def dense_mlp_rules() -> list[Rule]:
        """The gated MLP of the layers without experts (every layer of a dense model)."""
        mlp = "model.layers.*.mlp."
        return [
            Rule(
                "decoder.layers.*.mlp.linear_fc1.weight",
                (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                "gate_up",
                "dense",
            ),
            Rule(
                "decoder.layers.*.mlp.linear_fc2.weight",
                (mlp + "down_proj.weight",),
                "copy",
                "dense",
            ),
        ]

    def moe_rules(self, arch: ModelArch) -> list[Rule]:
        """Router, experts (and shared expert) of the MoE layers; MoE families define it."""
        raise MinitronError(f"{self.name} models have no experts")

    def arch_from_config(self, raw: dict[str, Any], source: str) -> ModelArch:
        self.check_config_keys(raw, source)
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if key not in raw:
                raise MinitronError(f"{source}: missing required key {key!r}")
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") if self.has_head_dim else None
        theta, scaling = parse_rope(raw, source)
        extra = {k: raw[k] for k in (*EXTRA_KEYS, *self.extra_keys) if k in raw}
        return ModelArch(
            family=self.name,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            ffn_hidden_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim or raw["hidden_size"] // heads,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hf_extra=extra,
            **self.moe_fields(raw, source),
        )

    def moe_fields(self, raw: dict[str, Any], source: str) -> dict[str, Any]:
        """ModelArch's MoE fields from config.json (MoE families); none for dense ones."""
        return {}

    def moe_config_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        """config.json entries of the MoE fields (inverse of `moe_fields`)."""
        return {}

    def hf_config_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        if not self.has_head_dim and arch.head_dim * arch.num_attention_heads != arch.hidden_size:
            raise MinitronError(
                f"{self.name} cannot represent head_dim {arch.head_dim} != hidden_size / heads"
            )
        kwargs: dict[str, Any] = {
            "architectures": [self.architectures[0]],
            "vocab_size": arch.vocab_size,
            "hidden_size": arch.hidden_size,
            "intermediate_size": arch.ffn_hidden_size,
            "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.num_attention_heads,
            "num_key_value_heads": arch.num_query_groups,
            "max_position_embeddings": arch.max_position_embeddings,
            "rms_norm_eps": arch.norm_eps,
            "tie_word_embeddings": arch.tie_embeddings,
            "rope_parameters": rope_parameters(arch),
            "hidden_act": "silu",
            **arch.hf_extra,
        }
        if self.has_head_dim:
            kwargs["head_dim"] = arch.head_dim
        kwargs.update(self.moe_config_kwargs(arch))
        return kwargs


LLAMA_CONFIG_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
    }
)


@register
class Llama(LlamaLike):
    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_type = "llama"
    config_keys = LLAMA_CONFIG_KEYS
    required_values = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
