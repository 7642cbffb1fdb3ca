"""From importance scores and the target architecture to the units kept (no megatron)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch


@dataclass
class PrunePlan:
    """Indices to keep, in the source's order (all ascending)."""

    arch: ModelArch
    channels: list[int]
    layers: list[int]
    neurons: dict[int, list[int]]
    groups: dict[int, list[int]]
    heads: dict[int, list[int]]  # global query-head indices kept, grouped by kept group
    source_layers: int
    experts: dict[int, list[int]] = field(default_factory=dict)
    """MoE layers: the source experts kept (new expert j is source expert experts[i][j])."""
    expert_neurons: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    """MoE layers: per kept source expert, its kept neurons."""
    shared_neurons: dict[int, list[int]] = field(default_factory=dict)
    """MoE layers with a shared expert: its kept neurons."""

    @property
    def dropped_layers(self) -> list[int]:
        return [i for i in range(self.source_layers) if i not in set(self.layers)]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores (stable: ties keep the lower index), ascending."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def select(
    source: ModelArch,
    arch: ModelArch,
    heads: torch.Tensor,
    neurons: torch.Tensor,
    channels: torch.Tensor,
    layers: list[int],
    experts: dict[int, dict[str, torch.Tensor]] | None = None,
    expert_score: str = "reap",
) -> PrunePlan:
    """Keep the most important units: channels globally, the rest per kept layer.

    Query groups are ranked by the L2 norm of their heads' scores; inside each kept group the
    same number of heads is kept (the best of that group). In MoE layers each layer keeps its
    own best experts by `expert_score`, each kept expert its own best neurons.
    """
    per_group_src = source.num_attention_heads // source.num_query_groups
    per_group = arch.num_attention_heads // arch.num_query_groups
    if source.is_moe:  # kept layers keep their kind: MoE layers renumbered after depth pruning
        arch = arch.replace(moe_layers=[j for j, i in enumerate(layers) if source.is_moe_layer(i)])
    plan = PrunePlan(
        arch=arch,
        channels=_top(channels, arch.hidden_size),
        layers=layers,
        neurons={},
        groups={},
        heads={},
        source_layers=source.num_layers,
    )
    for i in layers:
        if not source.is_moe_layer(i):
            plan.neurons[i] = _top(neurons[i], arch.ffn_hidden_size)
        else:
            _select_experts(plan, source, arch, i, (experts or {}).get(i), expert_score)
        head_scores = heads[i].view(source.num_query_groups, per_group_src)
        plan.groups[i] = _top(head_scores.norm(dim=1), arch.num_query_groups)
        kept = []
        for g in plan.groups[i]:
            kept += [g * per_group_src + h for h in _top(head_scores[g], per_group)]
        plan.heads[i] = kept
    return plan


def _select_experts(
    plan: PrunePlan,
    source: ModelArch,
    arch: ModelArch,
    i: int,
    scores: dict[str, torch.Tensor] | None,
    expert_score: str,
) -> None:
    """Experts, expert neurons and shared-expert neurons kept in MoE layer i."""
    same = (
        arch.num_experts == source.num_experts
        and arch.moe_ffn_hidden_size == source.moe_ffn_hidden_size
        and arch.moe_shared_expert_size == source.moe_shared_expert_size
    )
    if scores is None:
        if not same:
            raise ValueError(f"layer {i}: no expert importance to prune experts with")
        scores = {}
    everything = list(range(source.num_experts))
    if arch.num_experts == source.num_experts:
        plan.experts[i] = everything
    else:
        if expert_score not in scores:
            have = sorted(set(scores) - {"neurons", "shared_neurons"})
            raise MinitronError(
                f"prune.expert_score: the importance has no {expert_score} expert scores "
                f"(layer {i}); recalibrate or choose one of {have}"
            )
        plan.experts[i] = _top(scores[expert_score], arch.num_experts)
    width = list(range(source.moe_ffn_hidden_size))
    plan.expert_neurons[i] = {
        e: width
        if arch.moe_ffn_hidden_size == source.moe_ffn_hidden_size
        else _top(scores["neurons"][e], arch.moe_ffn_hidden_size)
        for e in plan.experts[i]
    }
    if source.moe_shared_expert_size:
        plan.shared_neurons[i] = (
            list(range(source.moe_shared_expert_size))
            if arch.moe_shared_expert_size == source.moe_shared_expert_size
            else _top(scores["shared_neurons"], arch.moe_shared_expert_size)
        )
