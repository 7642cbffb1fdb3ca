"""Vocab-parallel building blocks of the fused losses (vocab_loss.py, topk_loss.py): no
autograd here, the losses provide their gradients analytically.

Legend: t = tokens, v = this rank's vocab slice (the full vocab when the TP group has one rank).
Softmax statistics are reduced over the TP group as megatron's cross entropy does (max, then
sum of exponentials).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 logits are reduced in fp32; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def parallel(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def log_softmax(x_tv: torch.Tensor, group) -> torch.Tensor:
    """log_softmax over the full vocabulary (no autograd: callers provide the gradient)."""
    if not parallel(group):
        return torch.log_softmax(x_tv, dim=-1)
    row_max = x_tv.amax(dim=-1, keepdim=True)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    shifted = x_tv - row_max
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
    return shifted.sub_(sum_exp.log_())


def sum_tokens(x_t: torch.Tensor, group) -> torch.Tensor:
    if parallel(group):
        dist.all_reduce(x_t, op=dist.ReduceOp.SUM, group=group)
    return x_t


def local_labels(labels_t: torch.Tensor, v_local: int, vocab_start: int):
    """(rows, local column) of the labels that fall in this rank's vocab slice."""
    local = labels_t - vocab_start
    rows = ((local >= 0) & (local < v_local)).nonzero(as_tuple=True)[0]
    return rows, local[rows]


def gather_labels(x_tv: torch.Tensor, labels_t: torch.Tensor, vocab_start: int, group):
    """x[t, label_t] over the TP-split vocabulary (0 from ranks that do not hold the label)."""
    out = torch.zeros(x_tv.shape[0], dtype=x_tv.dtype, device=x_tv.device)
    rows, cols = local_labels(labels_t, x_tv.shape[1], vocab_start)
    out[rows] = x_tv[rows, cols]
    return sum_tokens(out, group)


def save_for_student_grad(
    ctx, kl_dir, q1, labels_t, vocab_start: int, dtype, backward_once: bool = True
) -> None:
    """What `student_grad` needs: the KL's gradient direction [t, v] (or None), the student's
    softmax at T = 1 when the NLL has a gradient (or None), the labels, the slice's start.
    With `backward_once` (training) the saved [t, v] tensors become the gradient in place, so
    no second full-size buffer exists; differentiating twice (retain_graph, e.g. gradcheck)
    needs False (with True autograd's version check fails the second backward)."""
    ctx.save_for_backward(kl_dir, q1, labels_t)
    ctx.vocab_start = vocab_start
    ctx.dtype = dtype
    ctx.backward_once = backward_once


def student_grad(ctx, grad_kl_t: torch.Tensor, grad_nll_t: torch.Tensor):
    """d(loss)/d(student logit slice) from what `save_for_student_grad` kept."""
    kl_dir, q1, labels_t = ctx.saved_tensors
    scale = torch.Tensor.mul_ if ctx.backward_once else torch.mul
    grad = None
    if kl_dir is not None:
        grad = scale(kl_dir, grad_kl_t[:, None])
    if q1 is not None:
        term = scale(q1, grad_nll_t[:, None])
        grad = term if grad is None else grad.add_(term)
        rows, cols = local_labels(labels_t, q1.shape[1], ctx.vocab_start)
        grad[rows, cols] -= grad_nll_t[rows]
    return grad.to(ctx.dtype) if grad is not None else None
