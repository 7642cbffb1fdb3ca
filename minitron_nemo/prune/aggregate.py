"""Reductions of per-token magnitudes over the sequence and over samples (P1 Table 13)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_sequence(mag_sbn: torch.Tensor, how: str) -> torch.Tensor:
    """[s, b, n] per-token magnitudes -> [b, n] per sample."""
    mag = mag_sbn.double()
    if how == "mean":
        return mag.mean(0)
    if how == "l2":
        return mag.pow(2).sum(0).sqrt()
    if how == "var":
        return mag.var(0, unbiased=False)
    raise ValueError(how)


class SampleAggregate:
    """Streaming reduction over samples of [b, n] vectors: mean, l2 or var."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.count = 0

    def add(self, values_bn: torch.Tensor) -> None:
        values = values_bn.double().cpu()
        if self.sum is None:
            self.sum = torch.zeros(values.shape[1:], dtype=torch.double)
            self.sumsq = torch.zeros_like(self.sum)
        self.sum += values.sum(0)
        self.sumsq += values.pow(2).sum(0)
        self.count += values.shape[0]

    def all_reduce(self, group) -> None:
        """Merge the samples seen by every rank of `group` (data-parallel ranks reading different
        calibration samples): sums, sums of squares and counts add up."""
        assert self.sum is not None and self.sumsq is not None, "no samples were seen"
        packed = torch.cat([self.sum.flatten(), self.sumsq.flatten(),
                            torch.tensor([float(self.count)], dtype=torch.double)])  # fmt: skip
        dist.all_reduce(packed, group=group)
        n = self.sum.numel()
        self.sum = packed[:n].view_as(self.sum)
        self.sumsq = packed[n : 2 * n].view_as(self.sumsq)
        self.count = int(round(packed[-1].item()))

    def result(self) -> torch.Tensor:
        assert self.sum is not None and self.sumsq is not None, "no samples were seen"
        if self.how == "l2":
            return self.sumsq.sqrt()
        mean = self.sum / self.count
        if self.how == "mean":
            return mean
        return (self.sumsq / self.count - mean.pow(2)).clamp_min(0)
