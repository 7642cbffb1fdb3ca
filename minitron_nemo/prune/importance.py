"""Activation-based importance (P1 section 2.2), gathered across TP and PP.

Forward hooks on this rank's layers record, per calibration sample, one magnitude per unit:
- attention head i, `activation` (P1): L2 norm over head_dim of the head's output o (input of
  `linear_proj`);
- attention head i, `taylor` (the default; Michel et al. 2019, "Are Sixteen Heads Really Better
  than One?"): |sum over the sample's tokens of g . o|, g = dLoss/do, the first-order estimate
  of the loss change when the head is masked. It needs one backward pass per micro-batch
  (parameters frozen: no weight gradients are kept). On SmolLM2 the activation norm ranks heads
  inside a query group worse than random (the heads of a group share K and V, so their output
  norms mostly say how peaked each head's attention is, not what removing it costs); see
  bench/prune_quality.py;
- MLP neuron i: |activation| at the input of `linear_fc2` (after the gated SwiGLU);
- embedding channel i: |output| of every RMSNorm (input_layernorm, pre_mlp_layernorm), summed
  over all norms of all layers;
- layer: block importance 1 - cos(x_in, x_out) per token.
Magnitudes are reduced over the sequence first (`seq`), then over samples (`batch`), each with
`mean`, `l2` or `var` (default batch L2, sequence mean: P1 Table 13's best).
With data-parallel ranks (expert parallelism: the calibration runs on tp x pp x ep ranks) each
calibration step's micro-batch is split over the ranks, each rank's loss is scaled by its share
of the step's samples (the gradients are then the whole step's) and the per-sample aggregates
are added up over the data-parallel group before they are gathered: the scores equal those of
one rank reading every sample.
Shapes: s = sequence, b = micro-batch, n = heads on this rank, d = head dim.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from minitron_nemo.prune.aggregate import SampleAggregate, reduce_sequence
from minitron_nemo.prune.expert_importance import ExpertCollector, join_ep, join_tp


@dataclass
class Importance:
    """Scores of the full (gathered) model; all tensors are float64 on CPU."""

    heads: torch.Tensor  # [L, num_attention_heads]: the score chosen by `head_score`
    neurons: torch.Tensor  # [L, ffn_hidden_size]
    channels: torch.Tensor  # [hidden_size], summed over all norms of all layers
    channels_per_layer: torch.Tensor  # [L, hidden_size]
    block_importance: torch.Tensor  # [L]
    num_samples: int
    seq_length: int
    aggregation: dict[str, str]
    layer_skip_loss: torch.Tensor | None = None  # [L] LM loss with layer i skipped
    block_loss: dict[int, list[float]] | None = None  # k -> LM loss with block [i, i+k) skipped
    base_loss: float | None = None
    head_score: str = "activation"
    heads_activation: torch.Tensor | None = None  # [L, num_attention_heads]
    heads_taylor: torch.Tensor | None = None  # [L, num_attention_heads] (head_score taylor)
    experts: dict[int, dict[str, torch.Tensor]] | None = None
    """Per MoE layer: expert scores [E] (prune/expert_importance.py), `neurons` [E, I] and
    `shared_neurons` [I_shared]."""

    def to_state(self) -> dict:
        return dict(self.__dict__)


class ImportanceCollector:
    """Registers the hooks on this rank's model shard and accumulates per-layer scores."""

    def __init__(
        self, model: torch.nn.Module, seq: str = "mean", batch: str = "l2", taylor: bool = False
    ) -> None:
        self.seq, self.batch = seq, batch
        self.heads: dict[int, SampleAggregate] = {}
        self.taylor: dict[int, SampleAggregate] = {}
        self.want_taylor = taylor
        self.neurons: dict[int, SampleAggregate] = {}
        self.channels: dict[int, list[SampleAggregate]] = {}
        self.cos_sum: dict[int, float] = {}
        self.cos_count: dict[int, int] = {}
        self.handles = []
        self.experts = ExpertCollector(model, taylor, seq, batch)
        for layer in model.decoder.layers:
            g = layer.layer_number - 1
            attn = layer.self_attention
            self.heads[g] = SampleAggregate(batch)
            self.taylor[g] = SampleAggregate("mean")
            self.neurons[g] = SampleAggregate(batch)
            self.channels[g] = [SampleAggregate(batch), SampleAggregate(batch)]
            self.cos_sum[g], self.cos_count[g] = 0.0, 0
            head_dim = attn.hidden_size_per_attention_head
            if hasattr(layer.mlp, "linear_fc2"):  # a dense MLP (MoE layers: see local_scores)
                self.handles.append(
                    layer.mlp.linear_fc2.register_forward_pre_hook(partial(self._on_neurons, g))
                )
            else:
                self.neurons[g] = None
                self.ffn_local = layer.mlp.config.ffn_hidden_size // (
                    parallel_state.get_tensor_model_parallel_world_size()
                )
            self.handles += [
                attn.linear_proj.register_forward_pre_hook(partial(self._on_heads, g, head_dim)),
                layer.input_layernorm.register_forward_hook(partial(self._on_norm, g, 0)),
                layer.pre_mlp_layernorm.register_forward_hook(partial(self._on_norm, g, 1)),
                layer.register_forward_hook(partial(self._on_layer, g), with_kwargs=True),
            ]

    def _on_heads(self, g: int, head_dim: int, _module, args) -> None:
        x_sbe = args[0]
        s, b, e = x_sbe.shape
        mag_sbn = x_sbe.detach().view(s, b, e // head_dim, head_dim).float().norm(dim=-1)
        self.heads[g].add(reduce_sequence(mag_sbn, self.seq))
        if self.want_taylor and x_sbe.requires_grad:
            x = x_sbe.detach()
            x_sbe.register_hook(partial(self._on_head_grad, g, head_dim, x))

    def _on_head_grad(self, g: int, head_dim: int, x_sbe: torch.Tensor, grad_sbe) -> None:
        s, b, e = x_sbe.shape
        gx_sbn = (grad_sbe.double() * x_sbe.double()).view(s, b, e // head_dim, head_dim).sum(-1)
        self.taylor[g].add(gx_sbn.sum(0).abs())  # [b, n]: |first-order loss change| per sample

    def _on_neurons(self, g: int, _module, args) -> None:
        self.neurons[g].add(reduce_sequence(args[0].detach().abs(), self.seq))

    def _on_norm(self, g: int, which: int, _module, _args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self.channels[g][which].add(reduce_sequence(out.detach().abs(), self.seq))

    def _on_layer(self, g: int, _module, args, kwargs, output) -> None:
        x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        x_out = output[0]
        cos = F.cosine_similarity(x_in.detach().double(), x_out.detach().double(), dim=-1)
        self.cos_sum[g] += cos.sum().item()
        self.cos_count[g] += cos.numel()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.experts.remove()

    def merge_ranks(self) -> None:
        """Add up the samples every data-parallel rank saw (collectives: every rank calls it)."""
        self.experts.merge_ranks()
        if parallel_state.get_data_parallel_world_size() == 1:
            return
        group = parallel_state.get_data_parallel_group()
        for g in sorted(self.heads):
            aggregates = [self.heads[g], *self.channels[g]]
            aggregates += [self.taylor[g]] if self.want_taylor else []
            aggregates += [self.neurons[g]] if self.neurons[g] is not None else []
            for aggregate in aggregates:
                aggregate.all_reduce(group)
            cos = torch.tensor([self.cos_sum[g], float(self.cos_count[g])], dtype=torch.double)
            dist.all_reduce(cos, group=group)
            self.cos_sum[g], self.cos_count[g] = cos[0].item(), int(round(cos[1].item()))

    def local_scores(self) -> dict[int, dict[str, torch.Tensor]]:
        experts = self.experts.local_scores()
        return {
            g: {
                "heads": self.heads[g].result(),
                "taylor": self.taylor[g].result() if self.want_taylor else self.heads[g].result(),
                # An MoE layer has no dense MLP neurons: zeros keep the [L, ffn] layout (its
                # routed experts keep their width; dense-ffn targets apply to dense layers).
                "neurons": self.neurons[g].result()
                if self.neurons[g] is not None
                else torch.zeros(self.ffn_local),
                "channels": self.channels[g][0].result() + self.channels[g][1].result(),
                "bi": torch.tensor(1.0 - self.cos_sum[g] / max(self.cos_count[g], 1)),
                **({"experts": experts[g]} if g in experts else {}),
            }
            for g in self.heads
        }


def gather_scores(
    local: dict[int, dict[str, torch.Tensor]], num_layers: int
) -> dict[str, torch.Tensor]:
    """Join every rank's per-layer scores: TP shards concatenated in rank order, PP stages
    united, experts concatenated in EP-rank order (data-parallel ranks hold the same merged
    scores). Returns [L, ...] tensors, identical on every rank."""
    ranks = (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_expert_model_parallel_rank(),
        parallel_state.get_expert_tensor_parallel_rank(),
    )
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (ranks, local))
    by_layer: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    expert_shards: dict[int, dict[tuple[int, int], dict[str, torch.Tensor]]] = {}
    for (rank_tp, rank_ep, rank_etp), scores in gathered:
        for g, entry in scores.items():
            by_layer.setdefault(g, {})[rank_tp] = entry
            if "experts" in entry:
                expert_shards.setdefault(g, {})[(rank_ep, rank_etp)] = entry["experts"]
    if sorted(by_layer) != list(range(num_layers)):
        raise RuntimeError(
            f"importance gathered for layers {sorted(by_layer)}, not 0..{num_layers - 1}"
        )
    out: dict[str, list[torch.Tensor]] = {
        "heads": [], "taylor": [], "neurons": [], "channels": [], "bi": []
    }  # fmt: skip
    experts = {}
    for g in range(num_layers):
        shards = [by_layer[g][r] for r in sorted(by_layer[g])]
        if g in expert_shards:
            per_ep: dict[int, list] = {}
            for (rank_ep, _), entry in sorted(expert_shards[g].items()):
                per_ep.setdefault(rank_ep, []).append(entry)
            experts[g] = join_ep([join_tp(per_ep[r]) for r in sorted(per_ep)])
        out["heads"].append(torch.cat([s["heads"] for s in shards]))
        out["taylor"].append(torch.cat([s["taylor"] for s in shards]))
        out["neurons"].append(torch.cat([s["neurons"] for s in shards]))
        out["channels"].append(shards[0]["channels"])  # replicated across TP
        out["bi"].append(shards[0]["bi"])
    return {**{k: torch.stack(v) for k, v in out.items()}, "experts": experts or None}


def rank_steps(
    indices: Sequence[int], micro_batch_size: int, dp: int, dp_rank: int
) -> list[tuple[list[int], float]]:
    """The calibration steps of data-parallel rank `dp_rank` of `dp`: each step is the next
    `micro_batch_size` samples split over the ranks (a last step with fewer samples than ranks
    joins the one before); per step, this rank's sample indices and their fraction of the
    step's samples."""
    steps = [list(indices[i : i + micro_batch_size])
             for i in range(0, len(indices), micro_batch_size)]  # fmt: skip
    if len(steps) > 1 and len(steps[-1]) < dp:
        steps[-2] += steps.pop()
    out = []
    for step in steps:
        if len(step) < dp:
            raise ValueError(f"{len(step)} calibration samples cannot be split over {dp} ranks")
        share = [int(i) for i in torch.tensor(step).tensor_split(dp)[dp_rank]]
        out.append((share, len(share) / len(step)))
    return out


def collect_importance(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    num_samples: int,
    seq_length: int,
    num_layers: int,
    seq: str = "mean",
    batch: str = "l2",
    progress: bool = True,
    head_score: str = "taylor",
    vocab_size: int | None = None,
    expert_taylor: bool = False,
    loss_scales: Iterable[float] | None = None,
) -> Importance:
    """Run calibration micro-batches [b, s+1] (read one at a time) through the model (and back,
    for the taylor head score) and return the gathered importance. With data-parallel ranks,
    `batches` are this rank's shares of the calibration steps and `loss_scales` their fractions
    of each step's samples (`rank_steps`)."""
    from minitron_nemo.runtime.forward import run_forward, run_loss_backward
    from minitron_nemo.runtime.progress import Progress

    device = next(model.parameters()).device
    # One backward pass per micro-batch serves the taylor head score and the taylor expert score
    # (`expert_taylor`: an MoE model ranked by it); either one asks for it, on every rank alike.
    taylor = head_score == "taylor" or expert_taylor
    collector = ImportanceCollector(model, seq=seq, batch=batch, taylor=taylor)
    bar = Progress(total=num_samples * seq_length, desc="calibration", unit="tok", enabled=progress)
    scales = iter(loss_scales) if loss_scales is not None else None
    try:
        for chunk in batches:
            scale = next(scales) if scales is not None else 1.0
            if taylor:
                assert vocab_size is not None
                run_loss_backward(model, [chunk.to(device)], vocab_size, loss_scale=scale)
            else:
                run_forward(model, [chunk.to(device)], lambda out, _b: None)
            bar.update(round(chunk.shape[0] / scale) * seq_length)
    finally:
        collector.remove()
        bar.close()
    collector.merge_ranks()
    scores = gather_scores(collector.local_scores(), num_layers)
    return Importance(
        heads=scores["taylor"] if head_score == "taylor" else scores["heads"],
        head_score=head_score,
        heads_activation=scores["heads"],
        heads_taylor=scores["taylor"] if taylor else None,
        experts=scores["experts"],
        neurons=scores["neurons"],
        channels=scores["channels"].sum(0),
        channels_per_layer=scores["channels"],
        block_importance=scores["bi"],
        num_samples=num_samples,
        seq_length=seq_length,
        aggregation={"seq": seq, "batch": batch},
    )
