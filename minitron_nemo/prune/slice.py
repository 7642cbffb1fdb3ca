"""Slice an HF-named state dict to a `PrunePlan` (pure tensor indexing, no megatron).

Slicing works on the full (gathered) tensors in HF layout, where every unit is a plain row or
column: q_proj rows = heads x d, k/v rows = groups x d, o_proj columns = heads x d, gate/up rows
and down columns = neurons, every hidden-size axis = channels; one layer at a time
(`slice_layer`), so the prune stage holds one source layer while it fills its shards
(prune/shard_slice.py).
Shapes: n = heads, g = groups, d = head dim, h = hidden.
"""

from __future__ import annotations

import re

import torch

from minitron_nemo.models.arch import ModelArch
from minitron_nemo.prune.select import PrunePlan


def _rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    return t.index_select(0, torch.tensor(idx, dtype=torch.long))


def _cols(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    return t.index_select(1, torch.tensor(idx, dtype=torch.long))


def _unit_rows(t: torch.Tensor, units: list[int], width: int) -> torch.Tensor:
    """Keep whole blocks of `width` rows (a head or group of a [units*width, ...] tensor)."""
    rows = [u * width + j for u in units for j in range(width)]
    return _rows(t, rows)


def merge_pruned_heads(
    q_nd_h: torch.Tensor, scores: torch.Tensor, groups: int, keep_per_group: int
) -> torch.Tensor:
    """P1 section 2.3: in each group, with heads sorted by importance h_1..h_L and K kept,
    h_i <- h_i + (h_i - h_{2K-i+1}) for the last L-K kept heads (query heads only).
    `q_nd_h` is the q_proj weight (or bias) viewed [n, d, ...]."""
    merged = q_nd_h.clone()
    per_group = q_nd_h.shape[0] // groups
    for g in range(groups):
        local = torch.sort(
            scores[g * per_group : (g + 1) * per_group], descending=True, stable=True
        )
        order = [g * per_group + int(i) for i in local.indices]  # h_1..h_L (global indices)
        big_l, k = per_group, keep_per_group
        for i in range(max(1, 2 * k - big_l + 1), k + 1):  # 1-based, partner 2K-i+1 <= L
            partner = 2 * k - i + 1
            merged[order[i - 1]] = q_nd_h[order[i - 1]] + (
                q_nd_h[order[i - 1]] - q_nd_h[order[partner - 1]]
            )
    return merged


def slice_global(state: dict[str, torch.Tensor], source: ModelArch, plan: PrunePlan):
    """The pruned model's whole-model HF tensors (embedding, final norm, output layer) from
    the source's (only those present in `state` are sliced)."""
    ch = plan.channels
    out = {}
    if "model.embed_tokens.weight" in state:
        out["model.embed_tokens.weight"] = _cols(state["model.embed_tokens.weight"], ch)
    if "model.norm.weight" in state:
        out["model.norm.weight"] = _rows(state["model.norm.weight"], ch)
    if "lm_head.weight" in state and not source.tie_embeddings:
        out["lm_head.weight"] = _cols(state["lm_head.weight"], ch)
    return {k: v.contiguous() for k, v in out.items()}


def slice_layer(
    state: dict[str, torch.Tensor],
    i: int,
    j: int,
    source: ModelArch,
    plan: PrunePlan,
    head_scores: torch.Tensor | None = None,
    merge_heads: bool = False,
) -> dict[str, torch.Tensor]:
    """The HF tensors of pruned layer j, made from those of source layer i in `state`."""
    d = source.head_dim
    ch = plan.channels
    per_group_new = plan.arch.num_attention_heads // plan.arch.num_query_groups
    src, dst = f"model.layers.{i}.", f"model.layers.{j}."
    heads, groups, neurons = plan.heads[i], plan.groups[i], plan.neurons.get(i)
    out: dict[str, torch.Tensor] = {}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[dst + norm + ".weight"] = _rows(state[src + norm + ".weight"], ch)
    for suffix in ("weight", "bias"):
        q_name = src + "self_attn.q_proj." + suffix
        if q_name not in state:
            continue
        q = state[q_name]
        if merge_heads and head_scores is not None:
            q_nd = merge_pruned_heads(
                q.view(source.num_attention_heads, d, *q.shape[1:]),
                head_scores[i],
                source.num_query_groups,
                per_group_new,
            )
            q = q_nd.reshape(q.shape)
        q = _unit_rows(q, heads, d)
        k = _unit_rows(state[src + "self_attn.k_proj." + suffix], groups, d)
        v = _unit_rows(state[src + "self_attn.v_proj." + suffix], groups, d)
        if suffix == "weight":
            q, k, v = _cols(q, ch), _cols(k, ch), _cols(v, ch)
        out[dst + "self_attn.q_proj." + suffix] = q
        out[dst + "self_attn.k_proj." + suffix] = k
        out[dst + "self_attn.v_proj." + suffix] = v
    for norm in ("q_norm", "k_norm"):  # Qwen3: [head_dim], shared by every head: kept whole
        if src + f"self_attn.{norm}.weight" in state:
            out[dst + f"self_attn.{norm}.weight"] = state[src + f"self_attn.{norm}.weight"]
    o = _rows(state[src + "self_attn.o_proj.weight"], ch)
    out[dst + "self_attn.o_proj.weight"] = _cols(o, [h * d + j2 for h in heads for j2 in range(d)])
    if source.is_moe_layer(i):
        out.update(_slice_moe_layer(state, src, dst, plan, i))
        return {k: v.contiguous() for k, v in out.items()}
    for name in ("gate_proj", "up_proj"):
        out[dst + f"mlp.{name}.weight"] = _cols(
            _rows(state[src + f"mlp.{name}.weight"], neurons), ch
        )
    out[dst + "mlp.down_proj.weight"] = _cols(
        _rows(state[src + "mlp.down_proj.weight"], ch), neurons
    )
    return {k: v.contiguous() for k, v in out.items()}


# The MoE block of a layer in HF names (Qwen-MoE `mlp.`, Mixtral `block_sparse_moe.`): the router
# (`gate.weight` [E, h]) keeps the kept experts' rows; expert e's `gate_proj` / `up_proj` (`w1` /
# `w3`) [I, h] and `down_proj` (`w2`) [h, I] keep its kept neurons and the kept channels, and
# expert e becomes expert j (its rank among the kept ones); the shared expert likewise with its
# own neurons; its sigmoid gate [1, h] keeps the kept channels.
_MOE_BLOCK = re.compile(
    r"^(?P<block>mlp|block_sparse_moe)\.(?:experts\.(?P<e>\d+)\.|(?P<shared>shared_expert)\.)?"
    r"(?P<name>.+)$"
)
_READS_HIDDEN = ("gate_proj.weight", "up_proj.weight", "w1.weight", "w3.weight")
_WRITES_HIDDEN = ("down_proj.weight", "w2.weight")


def _slice_moe_layer(
    state: dict[str, torch.Tensor], src: str, dst: str, plan: PrunePlan, i: int
) -> dict[str, torch.Tensor]:
    """An MoE layer's router, kept experts and shared expert, sliced to the kept units."""
    ch = plan.channels
    kept = {e: j for j, e in enumerate(plan.experts[i])}
    out = {}
    for name, tensor in state.items():
        m = _MOE_BLOCK.match(name[len(src) :]) if name.startswith(src) else None
        if m is None:
            continue
        block, rest = m.group("block"), m.group("name")
        if m.group("e") is not None:  # a routed expert
            e = int(m.group("e"))
            if e not in kept:
                continue
            units, new = plan.expert_neurons[i][e], f"{block}.experts.{kept[e]}.{rest}"
        elif m.group("shared"):
            units, new = plan.shared_neurons[i], f"{block}.shared_expert.{rest}"
        elif rest == "gate.weight":  # the router
            out[dst + f"{block}.gate.weight"] = _cols(_rows(tensor, plan.experts[i]), ch)
            continue
        elif rest == "shared_expert_gate.weight":
            out[dst + f"{block}.{rest}"] = _cols(tensor, ch)
            continue
        else:
            raise ValueError(f"{name}: no slicing rule for this MoE tensor")
        if rest.endswith(_READS_HIDDEN):
            out[dst + new] = _cols(_rows(tensor, units), ch)
        elif rest.endswith(_WRITES_HIDDEN):
            out[dst + new] = _cols(_rows(tensor, ch), units)
        else:
            raise ValueError(f"{name}: no slicing rule for this MoE tensor")
    return out


def slice_state_dict(
    state: dict[str, torch.Tensor],
    source: ModelArch,
    plan: PrunePlan,
    head_scores: torch.Tensor | None = None,
    merge_heads: bool = False,
) -> dict[str, torch.Tensor]:
    """The pruned model's HF state dict (new layer j comes from source layer plan.layers[j]);
    for models held in memory (studies). The prune stage slices layer by layer on the shards."""
    out = slice_global(state, source, plan)
    for j, i in enumerate(plan.layers):
        out.update(slice_layer(state, i, j, source, plan, head_scores, merge_heads))
    return out
