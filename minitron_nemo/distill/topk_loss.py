"""Forward KL against the teacher's top-K tokens plus its tail mass, vocab-parallel over TP.

The teacher is described per token by `TeacherTopK`: its K most likely tokens S (ids), their
log-probabilities log p_i (i in S) and the log of the mass outside them,
log P_tail = log sum_{j not in S} p_j, all at temperature T. Computed from the teacher's logits
on the fly (`teacher_top_k`) or read from a cache (distill/teacher_cache.py): the loss is the
same function of the same three tensors. The student's q = softmax(s / T) is coarsened the same
way, q_i on S and Q_tail = sum_{j not in S} q_j, and the loss is the KL of the two (K + 1)-bucket
distributions:

    KL_K(p || q) = sum_{i in S} p_i (log p_i - log q_i) + P_tail (log P_tail - log Q_tail)

exact on the top-K support, the remaining mass one explicit bucket (not dropped, not
renormalised away); KL_K <= the full forward KL, with equality when the teacher puts no mass
outside S (e.g. K = vocabulary). Its gradient (analytic, as in vocab_loss.py):

    d KL_K / d s_j = (q_j - p_j) / T                   j in S
                   = q_j (1 - P_tail / Q_tail) / T     j not in S

i.e. the teacher's tail mass is spread over the student's tail in the student's own proportions.
The teacher's K + 1 buckets are renormalised to sum to 1 first (bf16 values in a cache round
p_i by up to 0.4%). At TP > 1 each rank holds a slice of the student's logits: the top-K
log-probabilities are gathered from the ranks that own the ids and Q_tail is summed over the
group; the backward pass needs no communication.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from minitron_nemo.distill.vocab_parallel import (
    gather_labels,
    log_softmax,
    parallel,
    save_for_student_grad,
    student_grad,
    sum_tokens,
    upcast,
)


class TeacherTopK(NamedTuple):
    """The teacher's distribution of t tokens, reduced to K tokens and a tail."""

    logp: torch.Tensor
    """[t, K] log p_i of the top-K tokens at temperature T (fp32, or bf16 from a cache)."""
    ids: torch.Tensor
    """[t, K] their token ids (global vocabulary ids)."""
    log_tail: torch.Tensor
    """[t] log of the mass outside the top K (-inf when there is none)."""

    def rows(self, start: int, end: int) -> TeacherTopK:
        return TeacherTopK(self.logp[start:end], self.ids[start:end], self.log_tail[start:end])


def _local_columns(ids_tk: torch.Tensor, v_local: int, vocab_start: int):
    """(row, k, local column) of the ids that fall in this rank's vocab slice."""
    local = ids_tk.long() - vocab_start
    rows, ks = ((local >= 0) & (local < v_local)).nonzero(as_tuple=True)
    return rows, ks, local[rows, ks]


def _gather_columns(x_tv: torch.Tensor, ids_tk: torch.Tensor, vocab_start: int, group):
    """x[t, ids[t, k]] [t, K] over the TP-split vocabulary, and this rank's (row, k, column)."""
    where = _local_columns(ids_tk, x_tv.shape[1], vocab_start)
    rows, ks, cols = where
    out = torch.zeros(ids_tk.shape, dtype=x_tv.dtype, device=x_tv.device)
    out[rows, ks] = x_tv[rows, cols]
    return sum_tokens(out, group), where


@torch.no_grad()
def teacher_top_k(
    logits_tv: torch.Tensor, k: int, temperature: float = 1.0, vocab_start: int = 0, group=None
) -> TeacherTopK:
    """The teacher's top-K tokens, log-probabilities and tail mass at temperature T from its
    logit slice (padded vocabulary rows already PAD_LOGIT). With TP, each rank's local top K
    are all-gathered and the best K of those kept (the same set on every rank)."""
    z = upcast(logits_tv) / temperature
    values, ids = z.topk(min(k, z.shape[1]), dim=-1)
    ids = ids + vocab_start
    if parallel(group):
        world = dist.get_world_size(group)
        all_values = [torch.empty_like(values) for _ in range(world)]
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_values, values.contiguous(), group=group)
        dist.all_gather(all_ids, ids.contiguous(), group=group)
        values, pick = torch.cat(all_values, -1).topk(k, dim=-1)
        ids = torch.cat(all_ids, -1).gather(-1, pick)
    log_p = log_softmax(z, group)
    logp, (rows, _ks, cols) = _gather_columns(log_p, ids, vocab_start, group)
    p = log_p.exp_()
    p[rows, cols] = 0  # the tail, summed directly (1 - sum p_S would cancel)
    log_tail = sum_tokens(p.sum(-1), group).log()
    return TeacherTopK(logp, ids, log_tail)


class _TopKLosses(torch.autograd.Function):
    """(kl_t, nll_t) of one chunk against a TeacherTopK; formulas in the module docstring."""

    @staticmethod
    def forward(
        ctx,
        student_tv: torch.Tensor,
        logp_tk: torch.Tensor,
        ids_tk: torch.Tensor,
        log_tail_t: torch.Tensor,
        labels_t: torch.Tensor,
        temperature: float,
        nll_grad: bool,
        vocab_start: int,
        group,
        backward_once: bool,
    ):
        s = upcast(student_tv)
        log_q1 = log_softmax(s, group)
        nll_t = -gather_labels(log_q1, labels_t, vocab_start, group)
        if temperature != 1.0:
            log_q = log_softmax(s / temperature, group)
        else:
            log_q = log_q1.clone() if nll_grad else log_q1
        log_q_s, (rows, ks, cols) = _gather_columns(log_q, ids_tk, vocab_start, group)
        q = log_q.exp_()
        q_s_local = q[rows, cols]
        q[rows, cols] = 0
        q_tail = sum_tokens(q.sum(-1), group).clamp_min(torch.finfo(q.dtype).tiny)
        # The teacher's K + 1 buckets, renormalised.
        lp = torch.cat([logp_tk.to(s.dtype), log_tail_t.to(s.dtype)[:, None]], dim=-1)
        lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        p = lp.exp()
        p_s, p_tail, lp_s, lp_tail = p[:, :-1], p[:, -1], lp[:, :-1], lp[:, -1]
        tail_term = torch.where(p_tail > 0, p_tail * (lp_tail - q_tail.log()), 0.0)
        kl_t = (p_s * (lp_s - log_q_s)).sum(-1) + tail_term
        kl_dir = q.mul_((1 - p_tail / q_tail)[:, None])  # q_j (1 - P_tail / Q_tail) off S
        kl_dir[rows, cols] = q_s_local - p_s[rows, ks]  # q_j - p_j on S
        if temperature != 1.0:
            kl_dir.div_(temperature)
        q1 = log_q1.exp_() if nll_grad else None
        save_for_student_grad(
            ctx, kl_dir, q1, labels_t, vocab_start, student_tv.dtype, backward_once
        )
        return kl_t, nll_t

    @staticmethod
    def backward(ctx, grad_kl_t: torch.Tensor, grad_nll_t: torch.Tensor):
        return (student_grad(ctx, grad_kl_t, grad_nll_t),) + (None,) * 9


def top_k_losses(
    student_tv: torch.Tensor,
    teacher: TeacherTopK,
    labels_t: torch.Tensor,
    temperature: float = 1.0,
    nll_grad: bool = False,
    vocab_start: int = 0,
    group=None,
    backward_once: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL_K (with gradient) and student NLL (with gradient when `nll_grad`) of one
    chunk of student logit slices against the teacher's top K. `backward_once`: see
    vocab_parallel.save_for_student_grad."""
    return _TopKLosses.apply(
        student_tv, teacher.logp, teacher.ids, teacher.log_tail, labels_t, temperature,
        nll_grad, vocab_start, group, backward_once,
    )  # fmt: skip
