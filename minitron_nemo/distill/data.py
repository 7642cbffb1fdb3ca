"""Deterministic global batches: the batch of step k depends only on k (exact resume)."""

from __future__ import annotations

import torch


def global_batch_indices(step: int, global_batch: int, num_samples: int, seed: int) -> list[int]:
    """Sample indices of optimizer step `step`: epochs of a seeded permutation, in order."""
    out = []
    for i in range(step * global_batch, (step + 1) * global_batch):
        epoch, pos = divmod(i, num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perm[pos]))
    return out


def microbatches_for_rank(
    samples: torch.Tensor,
    step: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
) -> list[torch.Tensor]:
    """This data-parallel rank's micro-batches [micro_batch, s+1] of step `step`."""
    idx = global_batch_indices(step, global_batch, samples.shape[0], seed)
    per_rank = global_batch // dp_size
    mine = idx[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [samples[mine[i : i + micro_batch]] for i in range(0, per_rank, micro_batch)]
