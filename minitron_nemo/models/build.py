"""Build the megatron-core model for a `ModelArch`: the one place a model is constructed."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.attention import SDPACoreAttention
from minitron_nemo.runtime import cpu_compat

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def te_available() -> bool:
    """TransformerEngine importable and a GPU present (TE needs CUDA)."""
    return (
        cpu_compat.cuda_available() and importlib.util.find_spec("transformer_engine") is not None
    )


def layer_spec(use_te: bool, qk_layernorm: bool = False) -> ModuleSpec:
    """TE spec (fused norms, FP8) when asked; else the local spec with SDPA core attention."""
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def decoder_spec(
    arch: ModelArch, config: TransformerConfig, use_te: bool
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder's spec: one layer spec for a dense model; for an MoE model megatron's block
    spec (MoE and dense layers as `config.moe_layer_freq` says; experts as SequentialMLP, or
    TEGroupedMLP when `config.moe_grouped_gemm`), with SDPA core attention in the local spec."""
    if not arch.is_moe:
        return layer_spec(use_te, arch.qk_layernorm)
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm"
    )
    if not use_te:
        for spec in block.layer_specs:
            spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return block


def moe_config_kwargs(arch: ModelArch, use_te: bool, aux_loss_coeff: float = 0.0) -> dict:
    """TransformerConfig fields of an MoE architecture: router (fp32, softmax, top-k, with or
    without renormalised top-k probabilities), dropless experts, shared expert, layer pattern,
    token dispatcher (alltoall, the EP > 1 choice on clusters; cpu_compat makes it run on gloo).
    The router's load-balancing loss is added only in training, scaled by `aux_loss_coeff`."""
    if not arch.is_moe:
        return {}
    pattern = arch.moe_layer_pattern()
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_router_topk,
        # norm_topk_prob true: top-k of the logits, then softmax over those k;
        # false: softmax over every expert, then top-k (probabilities not renormalised).
        moe_router_pre_softmax=not arch.moe_norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=use_te,
        moe_shared_expert_intermediate_size=arch.moe_shared_expert_size or None,
        moe_shared_expert_gate=arch.moe_shared_expert_gate,
        moe_layer_freq=1 if all(pattern) else pattern,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
    )


def transformer_config(
    arch: ModelArch,
    dtype: torch.dtype = torch.float32,
    perform_initialization: bool = False,
    fp8: str | None = None,
    fused_kernels: bool = False,
    sequence_parallel: bool = False,
    recompute: str = "none",
    moe_aux_loss_coeff: float = 0.0,
    wgrad_into_main_grad: bool = False,
) -> TransformerConfig:
    """megatron TransformerConfig for `arch` with the current parallel state's TP/PP/EP sizes.

    `wgrad_into_main_grad`: the model is trained under megatron DDP (every weight has a
    main_grad) and, on CPU, its weight gradients are added into main_grad by the GEMM.
    `fused_kernels` (with the TE spec on a GPU) turns on fused RoPE and the fused SwiGLU; off,
    CPU and GPU run the same unfused math. `recompute`: none, selective (core attention) or
    full (every layer)."""
    on_gpu = cpu_compat.cuda_available()
    recompute_kwargs = {}
    if recompute == "selective":
        recompute_kwargs = dict(recompute_granularity="selective")
    elif recompute == "full":
        recompute_kwargs = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=perform_initialization,
        init_method_std=0.02,
        apply_rope_fusion=fused_kernels,
        bias_activation_fusion=fused_kernels,
        # With apex / TE kernels beyond the TE spec itself: off on GPU. On CPU the weight
        # gradients of a trained model (megatron DDP's main_grad buffers) are accumulated
        # inside the GEMM (runtime/cpu_compat.py); models without main_grad never reach it.
        gradient_accumulation_fusion=wgrad_into_main_grad and cpu_compat.installed(),
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        # FP8 runs through TransformerEngine layers (the TE spec); megatron wraps the forward
        # in TE's fp8 autocast when `fp8` is set.
        fp8=fp8,
        **recompute_kwargs,
        # fused_kernels is set exactly when the TE spec runs on a GPU: grouped-GEMM experts then.
        **moe_config_kwargs(arch, use_te=fused_kernels, aux_loss_coeff=moe_aux_loss_coeff),
    )


def resolve_te(mode: str | bool | None, fp8: str | None = None) -> bool:
    """Whether to build with the TE spec: "on" / "off" / "auto" (= when TE runs here); FP8
    needs it. Refuses what cannot run here with one line."""
    mode = {True: "on", False: "off", None: "auto"}.get(mode, mode)
    if fp8 is not None:
        if mode == "off" or not te_available():
            raise MinitronError(f"fp8 = {fp8!r} needs TransformerEngine on a GPU (not available)")
        return True
    if mode == "on" and not te_available():
        raise MinitronError(
            "transformer_engine = on: TransformerEngine is not importable (or no GPU is present)"
        )
    return te_available() if mode == "auto" else mode == "on"


def build_model(
    arch: ModelArch,
    dtype: torch.dtype = torch.float32,
    use_te: str | bool | None = None,
    perform_initialization: bool = False,
    fp8: str | None = None,
    sequence_parallel: bool = False,
    recompute: str = "none",
    moe_aux_loss_coeff: float = 0.0,
    wgrad_into_main_grad: bool = False,
) -> GPTModel:
    """This rank's shard (TP slice, PP stage, EP experts) of the model, on the runtime device."""
    te = resolve_te(use_te, fp8)
    if sequence_parallel and not cpu_compat.cuda_available():
        raise MinitronError("parallel.sequence_parallel needs GPUs (its collectives need NCCL)")
    arch.check_parallel(
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        # A dense model (e.g. the student of an MoE teacher) ignores the expert grid.
        parallel_state.get_expert_model_parallel_world_size() if arch.is_moe else 1,
    )
    config = transformer_config(
        arch,
        dtype,
        perform_initialization,
        fp8,
        fused_kernels=te and cpu_compat.cuda_available(),
        sequence_parallel=sequence_parallel,
        recompute=recompute,
        moe_aux_loss_coeff=moe_aux_loss_coeff,
        wgrad_into_main_grad=wgrad_into_main_grad,
    )
    scaling = arch.rope_scaling or {}
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(arch, config, te),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=bool(scaling),
        rope_scaling_factor=float(scaling.get("factor", 8.0)),
        parallel_output=True,
    )
    if scaling:
        _set_llama3_rope(model, arch)
    if cpu_compat.cuda_available():
        model.cuda(torch.cuda.current_device())
    return model


def _set_llama3_rope(model: GPTModel, arch: ModelArch) -> None:
    """GPTModel forwards only `factor`; apply all llama3 rope parameters with mcore's scaler."""
    rope = model.rotary_pos_emb
    dim = arch.head_dim
    base = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = arch.rope_scaling or {}
    rope.inv_freq = rope._apply_scaling(
        base,
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    ).to(rope.inv_freq.device)
