"""Importance of the routed experts of MoE layers, their neurons and the shared expert's neurons.

Hooks on each local expert module of megatron's `SequentialMLP` see exactly the tokens routed to
that expert (with expert parallelism: from every EP rank's calibration samples) with their gate
values; megatron multiplies the gate value p into the expert's intermediate activation
(`MLP.forward(..., per_token_scale=p)`), so the expert module's output is p * y, y the expert's
own output. Per expert e of a layer, over the calibration tokens:
- `frequency`: fraction of tokens routed to e (the common baseline);
- `router_mass`: sum of p over the tokens routed to e, per token;
- `reap`: mean over the tokens routed to e of ||p * y|| (REAP, Lasby et al. 2025: router-weighted
  expert activation norm);
- `taylor` (with the calibration's backward pass, see `collect_importance`): mean over
  micro-batches of
  |sum over routed tokens of g . (p * y)|, g = dLoss/d(layer output): the first-order loss
  change when e's contribution is removed, the score the heads use;
- `neurons` [E, I]: per expert, the L2 norm over its routed tokens of each neuron's (gate-weighted)
  activation at the input of its `linear_fc2`: the width score, reduced over routed tokens only;
- `shared_neurons` [I_shared]: the shared expert's neurons, reduced like a dense MLP's.
With expert tensor parallelism each rank's expert output is a partial sum: it is all-reduced over
the expert-TP group before its norm (scores then agree on every rank); neuron scores are each
rank's own slice, concatenated in rank order when gathered.

With data / expert parallelism (the ranks read different calibration samples, `merge_ranks`):
router token counts and the shared expert's aggregates add up over the data-parallel group; a
local expert's statistics add up over its expert-data-parallel replicas (none when ep = dp);
each EP rank's experts are its own slice of the layer's, concatenated in EP-rank order when
gathered.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from minitron_nemo.prune.aggregate import SampleAggregate, reduce_sequence


class ExpertCollector:
    """Hooks on the MoE layers of this rank's shard; accumulates per-expert statistics."""

    def __init__(self, model: torch.nn.Module, taylor: bool, seq: str, batch: str) -> None:
        self.taylor = taylor
        self.seq = seq
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        self.shared: dict[int, SampleAggregate] = {}
        self.tokens: dict[int, int] = {}
        self.handles = []
        etp = parallel_state.get_expert_tensor_parallel_world_size()
        self.etp_group = parallel_state.get_expert_tensor_parallel_group() if etp > 1 else None
        self.dp = parallel_state.get_data_parallel_world_size()
        self.edp = parallel_state.get_expert_data_parallel_world_size()
        for layer in model.decoder.layers:
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                continue
            g = layer.layer_number - 1
            num, width = len(experts.local_experts), experts.local_experts[0].linear_fc2.weight
            self.stats[g] = {
                "count": torch.zeros(num, dtype=torch.float64),
                "mass": torch.zeros(num, dtype=torch.float64),
                "norm_sum": torch.zeros(num, dtype=torch.float64),
                "taylor_sum": torch.zeros(num, dtype=torch.float64),
                "batches": torch.zeros(1, dtype=torch.float64),
                "neurons_sq": torch.zeros(num, width.shape[1], dtype=torch.float64),
            }
            self.tokens[g] = 0
            self.handles.append(layer.mlp.router.register_forward_hook(partial(self._on_router, g)))
            for e, expert in enumerate(experts.local_experts):
                self.handles += [
                    expert.register_forward_hook(partial(self._on_expert, g, e)),
                    expert.linear_fc2.register_forward_pre_hook(partial(self._on_neurons, g, e)),
                ]
            shared = getattr(layer.mlp, "shared_experts", None)
            if shared is not None:
                self.shared[g] = SampleAggregate(batch)
                self.handles.append(
                    shared.linear_fc2.register_forward_pre_hook(partial(self._on_shared, g))
                )

    def _on_router(self, g: int, _module, args, _output) -> None:
        x = args[0]
        self.tokens[g] += x.numel() // x.shape[-1]
        self.stats[g]["batches"] += 1

    def _on_expert(self, g: int, e: int, _module, args, output) -> None:
        y_nh = output[0] if isinstance(output, tuple) else output  # p * expert output
        probs_n = args[1] if len(args) > 1 else None
        full = y_nh.detach()
        if self.etp_group is not None:
            full = full.clone()
            dist.all_reduce(full, group=self.etp_group)
        stats = self.stats[g]
        stats["count"][e] += y_nh.shape[0]
        if probs_n is not None:
            stats["mass"][e] += probs_n.detach().double().sum().cpu()
        stats["norm_sum"][e] += full.double().norm(dim=-1).sum().cpu()
        if self.taylor and y_nh.requires_grad:
            y_nh.register_hook(partial(self._on_expert_grad, g, e, full))

    def _on_expert_grad(self, g: int, e: int, y_nh: torch.Tensor, grad_nh: torch.Tensor) -> None:
        # With expert TP the gradient of a rank's partial output is that of the full output.
        self.stats[g]["taylor_sum"][e] += (grad_nh.double() * y_nh.double()).sum().abs().cpu()

    def _on_neurons(self, g: int, e: int, _module, args) -> None:
        self.stats[g]["neurons_sq"][e] += args[0].detach().double().pow(2).sum(0).cpu()

    def _on_shared(self, g: int, _module, args) -> None:
        x = args[0].detach()
        x_sbn = x if x.dim() == 3 else x.unsqueeze(1)
        self.shared[g].add(reduce_sequence(x_sbn.abs(), self.seq))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def merge_ranks(self) -> None:
        """Add up what the data-parallel ranks saw (see the module docstring); every rank of the
        model's grid calls it (collectives), after the last calibration step."""
        if self.dp > 1:
            group = parallel_state.get_data_parallel_group()
            for g in sorted(self.stats):
                tokens = torch.tensor([float(self.tokens[g])], dtype=torch.double)
                dist.all_reduce(tokens, group=group)
                self.tokens[g] = int(round(tokens.item()))
            for g in sorted(self.shared):
                self.shared[g].all_reduce(group)
        if self.edp > 1:
            group = parallel_state.get_expert_data_parallel_group()
            for g in sorted(self.stats):
                for key in ("count", "mass", "norm_sum", "taylor_sum", "neurons_sq"):
                    dist.all_reduce(self.stats[g][key], group=group)
                # taylor is a mean over micro-batches: each replica ran as many as this rank
                self.stats[g]["batches"] *= self.edp

    def local_scores(self) -> dict[int, dict[str, torch.Tensor]]:
        out = {}
        for g, s in self.stats.items():
            tokens = max(self.tokens[g], 1)
            scores = {
                "frequency": s["count"] / tokens,
                "router_mass": s["mass"] / tokens,
                "reap": s["norm_sum"] / s["count"].clamp_min(1),
                "neurons": s["neurons_sq"].sqrt(),
            }
            if self.taylor:
                scores["taylor"] = s["taylor_sum"] / s["batches"].clamp_min(1)
            if g in self.shared:
                scores["shared_neurons"] = self.shared[g].result()
            out[g] = scores
        return out


# Entries split over (expert) TP ranks along their last axis; the others are equal on every rank.
TP_SPLIT = ("neurons", "shared_neurons")
# Entries with one row per expert (split over EP ranks); the shared expert's are on every EP rank.
PER_EXPERT = ("frequency", "router_mass", "reap", "taylor", "neurons")


def join_tp(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One layer's expert scores from its TP ranks' (in rank order)."""
    return {
        key: torch.cat([s[key] for s in shards], dim=-1) if key in TP_SPLIT else shards[0][key]
        for key in shards[0]
    }


def join_ep(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One layer's expert scores from its EP ranks' (in rank order, each TP-joined): the
    per-expert rows concatenated, the shared expert's taken from the first."""
    return {
        key: torch.cat([s[key] for s in shards], dim=0) if key in PER_EXPERT else shards[0][key]
        for key in shards[0]
    }
