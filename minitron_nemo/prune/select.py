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
    expert_score: str = "taylor",
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
    """Experts, expert neurons and shared-expert neurons kept in MoE layer i (all of an axis
    the target leaves at the source's size, else the best by `scores`)."""
    scores = scores or {}

    def keep(n_source: int, n_kept: int, key: str, expert: int | None = None) -> list[int]:
        if n_kept == n_source:
            return list(range(n_source))
        if key not in scores:
            have = sorted(set(scores) - {"neurons", "shared_neurons"})
            raise MinitronError(
                f"prune: the importance has no {key} scores for MoE layer {i}; recalibrate"
                + (f" or set prune.expert_score to one of {have}" if have else "")
            )
        return _top(scores[key] if expert is None else scores[key][expert], n_kept)

    plan.experts[i] = keep(source.num_experts, arch.num_experts, expert_score)
    plan.expert_neurons[i] = {
        e: keep(source.moe_ffn_hidden_size, arch.moe_ffn_hidden_size, "neurons", e)
        for e in plan.experts[i]
    }
    if source.moe_shared_expert_size:
        plan.shared_neurons[i] = keep(
            source.moe_shared_expert_size, arch.moe_shared_expert_size, "shared_neurons"
        )
