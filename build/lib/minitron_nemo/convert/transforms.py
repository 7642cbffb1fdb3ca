"""Tensor transforms between HF and megatron layouts, and the TP split, written once.

Legend: n = query heads, g = query groups, d = head dim, h = hidden, f = ffn, v = vocab.
megatron's fused `linear_qkv` is interleaved per query group:
[q_g0 (n/g heads), k_g0, v_g0, q_g1, k_g1, v_g1, ...]; `linear_fc1` is [gate; up].
"""

from __future__ import annotations

import torch

from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.families.base import Rule


def hf_to_mcore(rule: Rule, hf: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """The full (unsharded) megatron tensor made from the HF tensors of `rule`."""
    if rule.kind == "copy":
        return hf[0]
    if rule.kind == "vocab":
        (table_vh,) = hf
        pad = arch.padded_vocab_size - table_vh.shape[0]
        return (
            torch.cat([table_vh, table_vh.new_zeros(pad, *table_vh.shape[1:])]) if pad else table_vh
        )
    if rule.kind == "gate_up":
        return torch.cat(hf, dim=0)
    if rule.kind == "qkv":
        q, k, v = hf
        g, d = arch.num_query_groups, arch.head_dim
        per_group = arch.num_attention_heads // g
        rest = q.shape[1:]
        return torch.cat(
            [q.reshape(g, per_group * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)],
            dim=1,
        ).reshape(g * (per_group + 2) * d, *rest)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def mcore_to_hf(rule: Rule, tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """The HF tensors of `rule` recovered from the full megatron tensor (inverse of above)."""
    if rule.kind == "copy":
        return [tensor]
    if rule.kind == "vocab":
        return [tensor[: arch.vocab_size]]
    if rule.kind == "gate_up":
        return list(tensor.chunk(2, dim=0))
    if rule.kind == "qkv":
        g, d = arch.num_query_groups, arch.head_dim
        per_group = arch.num_attention_heads // g
        rest = tensor.shape[1:]
        grouped = tensor.reshape(g, (per_group + 2) * d, *rest)
        q, k, v = grouped.split([per_group * d, d, d], dim=1)
        return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def tp_shard(
    full: torch.Tensor, param: torch.nn.Parameter, rule: Rule, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """This TP rank's slice of a full megatron tensor, read off megatron's param attributes.

    Column-parallel params (qkv, fc1, embedding, output layer) split dim 0, row-parallel
    ones dim 1; fc1 splits gate and up separately so each rank holds [gate_r; up_r].
    qkv rows are whole query groups per rank because groups are contiguous.
    """
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if rule.kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]])
    return full.chunk(tp_size, dim)[tp_rank]
