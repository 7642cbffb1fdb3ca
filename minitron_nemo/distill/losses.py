"""Distillation losses: pure functions of logits / hidden states, vocab-parallel over TP.

Legend: t = tokens (flattened sequence x batch), v = this rank's vocab slice (the full vocab
when `tp_group` is None), h = hidden size. Logits of padded vocab rows must already be masked
to PAD_LOGIT (see runtime.forward.mask_vocab_padding): a finite value, so that 0 * log 0 terms
stay 0 in both the forward and the backward pass (-inf would give NaN gradients).

Vocab-parallel softmax statistics follow megatron's cross entropy: the max is all-reduced with
MAX (no gradient needed: it cancels). The sum of exponentials is all-reduced with SUM and its
backward all-reduces too (each rank uses the total on its own vocab slice, so the gradients of
all ranks add up). The per-token KL sum is all-reduced with an identity backward: from there on
every rank computes the same loss and back-propagates the same gradient.
Tokens are processed in chunks under activation checkpointing, so the fp32 softmaxes of both
models exist for one chunk at a time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KL_KINDS = ("forward", "reverse")


class _ReduceSumToReplicated(torch.autograd.Function):
    """All-reduce SUM forward, identity backward (used identically by every rank afterwards)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ReduceSumShared(torch.autograd.Function):
    """All-reduce SUM forward and backward (each rank uses the result on its own slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _parallel(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceSumShared.apply(x, group) if _parallel(group) else x


def _all_reduce_sum_replicated(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceSumToReplicated.apply(x, group) if _parallel(group) else x


def _all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    if _parallel(group):
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def vocab_parallel_log_softmax(logits_tv: torch.Tensor, group=None) -> torch.Tensor:
    """log_softmax over the full (TP-split) vocabulary of this rank's logit slice."""
    logits = _upcast(logits_tv)
    row_max = _all_reduce_max(logits.detach().amax(dim=-1, keepdim=True), group)
    shifted = logits - row_max
    sum_exp = _all_reduce_sum(shifted.exp().sum(dim=-1, keepdim=True), group)
    return shifted - sum_exp.log()


def _kl_per_token(
    p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float, group
) -> torch.Tensor:
    """KL(P || Q) per token [t], P and Q given by logit slices [t, v]."""
    log_p = vocab_parallel_log_softmax(p_logits / temperature, group)
    log_q = vocab_parallel_log_softmax(q_logits / temperature, group)
    return _all_reduce_sum_replicated((log_p.exp() * (log_p - log_q)).sum(dim=-1), group)


def kl_divergence(
    student_logits_tv: torch.Tensor,
    teacher_logits_tv: torch.Tensor,
    temperature: float = 1.0,
    kind: str = "forward",
    mask_t: torch.Tensor | None = None,
    chunk_size: int | None = None,
    group=None,
) -> torch.Tensor:
    """Mean over (unmasked) tokens of KL(teacher || student) ("forward", the paper's best) or
    KL(student || teacher) ("reverse") at temperature T, scaled by T^2."""
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    teacher_logits_tv = teacher_logits_tv.detach()
    n = student_logits_tv.shape[0]
    chunk = chunk_size or n
    per_token = []
    for start in range(0, n, chunk):
        s = student_logits_tv[start : start + chunk]
        t = teacher_logits_tv[start : start + chunk]
        p, q = (t, s) if kind == "forward" else (s, t)
        if chunk < n and torch.is_grad_enabled():
            per_token.append(
                checkpoint(_kl_per_token, p, q, temperature, group, use_reentrant=False)
            )
        else:
            per_token.append(_kl_per_token(p, q, temperature, group))
    kl_t = torch.cat(per_token)
    return _masked_mean(kl_t, mask_t) * temperature**2


def top_k_forward_kl(
    student_logits_tv: torch.Tensor,
    teacher_logits_tv: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    mask_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL on the teacher's top-k tokens plus one bucket for the rest of the vocabulary
    (the reference formula of distill/topk_loss.py, by autograd; full vocabulary on one rank):
    sum_{i in S} p_i (log p_i - log q_i) + P_tail (log P_tail - log Q_tail), scaled by T^2."""
    top = teacher_logits_tv.detach().topk(k, dim=-1).indices
    log_p = _upcast(teacher_logits_tv.detach() / temperature).log_softmax(-1)
    log_q = _upcast(student_logits_tv / temperature).log_softmax(-1)
    in_top = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, top, True)

    def tail(x):
        return x.masked_fill(in_top, float("-inf")).logsumexp(-1)

    lp_s, lq_s = log_p.gather(-1, top), log_q.gather(-1, top)
    lp_tail, lq_tail = tail(log_p), tail(log_q)
    tail_term = torch.where(
        lp_tail > float("-inf"), lp_tail.exp() * (lp_tail - lq_tail), torch.zeros_like(lp_tail)
    )
    kl_t = (lp_s.exp() * (lp_s - lq_s)).sum(-1) + tail_term
    return _masked_mean(kl_t, mask_t) * temperature**2


def intermediate_loss(
    student_th: torch.Tensor,
    teacher_th: torch.Tensor,
    projection: torch.nn.Module | None,
    kind: str = "cosine",
    mask_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between a student and a teacher hidden state (after the norm), the student
    mapped up by the learned projection: 1 - cos (default) or MSE, mean over tokens."""
    mapped = projection(student_th) if projection is not None else student_th
    target = teacher_th.detach().to(mapped.dtype)
    if kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(_upcast(mapped), _upcast(target), dim=-1)
    elif kind == "mse":
        per_token = (_upcast(mapped) - _upcast(target)).pow(2).mean(-1)
    else:
        raise ValueError(f"intermediate loss kind must be cosine or mse, got {kind!r}")
    return _masked_mean(per_token, mask_t)


def dynamic_alpha(logits_loss: torch.Tensor, intermediate: torch.Tensor) -> torch.Tensor:
    """P1: alpha = L_logits / L_intermediate, detached (brings both terms to the same scale)."""
    return (logits_loss.detach() / intermediate.detach().clamp_min(1e-12)).detach()


def combine(
    logits_loss: torch.Tensor | None,
    intermediate: torch.Tensor | None,
    lm_loss: torch.Tensor | None,
    weights: dict[str, float],
    dynamic: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss = w_logits L_logits + alpha L_is + w_lm L_lm; alpha dynamic or fixed."""
    total = None
    logs: dict[str, float] = {}

    def add(term: torch.Tensor, weight: float | torch.Tensor, name: str) -> None:
        nonlocal total
        logs[name] = float(term.detach())
        total = term * weight if total is None else total + term * weight

    if logits_loss is not None:
        add(logits_loss, weights.get("logits", 1.0), "loss_logits")
    if intermediate is not None:
        if dynamic and logits_loss is not None:
            alpha = dynamic_alpha(logits_loss, intermediate)
        else:
            alpha = torch.tensor(weights.get("intermediate", 1.0))
        logs["alpha"] = float(alpha)
        add(intermediate, alpha, "loss_intermediate")
    if lm_loss is not None:
        add(lm_loss, weights.get("lm", 1.0), "loss_lm")
    if total is None:
        raise ValueError("no loss term is enabled")
    logs["loss"] = float(total.detach())
    return total, logs


def _masked_mean(values_t: torch.Tensor, mask_t: torch.Tensor | None) -> torch.Tensor:
    if mask_t is None:
        return values_t.mean()
    mask = mask_t.to(values_t.dtype)
    return (values_t * mask).sum() / mask.sum().clamp_min(1.0)
