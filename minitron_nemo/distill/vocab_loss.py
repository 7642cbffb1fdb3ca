"""The per-token losses over the vocabulary in one pass, with analytic gradients.

Legend: t = tokens of a chunk, v = this rank's vocab slice (the full vocab when the TP group has
one rank), h = hidden size. `p` is the teacher's softmax, `q` the student's, both at temperature
T over the full (TP-split) vocabulary.

    forward KL  KL(p || q) per token = sum_v p (log p - log q)   d/ds = (q - p) / T
    reverse KL  KL(q || p) per token = sum_v q (log q - log p)   d/ds = q (log q - log p - KL) / T
    NLL         -log q1[label]  (student at T = 1)               d/ds = q1 - onehot(label)

Computing these directly (native log_softmax on one rank; max and sum-exp all-reduced over TP,
as megatron's cross entropy does) and saving only the gradient direction for backward replaces
the autograd chain of the reference formulas in `losses.py` (which the tests compare against):
fewer full-vocabulary passes, fewer saved tensors, and the student's NLL for logging comes out of
the same softmax instead of a separate cross entropy. Backward needs no communication: each rank's
slice of (q - p) is the gradient of its slice of the logits.

`chunked_vocab_losses` also folds in the output layer: the student's and the teacher's logits
exist one chunk of tokens at a time (recomputed in backward when there is more than one chunk),
so full-vocabulary fp32 logits of both models never exist at once.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minitron_nemo.distill.topk_loss import TeacherTopK, teacher_top_k, top_k_losses
from minitron_nemo.distill.vocab_parallel import (
    gather_labels,
    log_softmax,
    parallel,
    save_for_student_grad,
    student_grad,
    sum_tokens,
    upcast,
)
from minitron_nemo.runtime.forward import PAD_LOGIT

ROW_BLOCK_ELEMENTS = 1 << 21
"""Rows of a chunk are reduced a block of about this many logits (8 MiB in fp32) at a time: the
softmax temporaries of one block stay small and are reused by the allocator instead of being
fresh full-chunk buffers (on CPU each fresh 100 MB buffer is page-faulted in again), and a
chunk's peak holds only its outputs. Rows are independent, so the results do not depend on it."""


def _block_losses(s, t, labels_t, temperature, kind, nll_grad, vocab_start, group, kl_dir, q1):
    """(kl_t, nll_t) of one block of rows; writes the block's rows of `kl_dir` (the KL's
    gradient direction) and `q1` (the student's softmax at T = 1) when they are given."""
    s = upcast(s)
    log_q1 = log_softmax(s, group)
    nll_t = -gather_labels(log_q1, labels_t, vocab_start, group)
    kl_t = torch.zeros_like(nll_t)
    if nll_grad:
        torch.exp(log_q1, out=q1)
    if t is not None:
        t = upcast(t)
        q = None
        if temperature != 1.0:
            t = t / temperature
            log_q = log_softmax(s / temperature, group)
        else:  # log_q1 is not needed any more: it may be overwritten
            log_q, q = log_q1, q1
        log_p = log_softmax(t, group)
        if kind == "forward":
            p = log_p.exp()
            kl_t = sum_tokens(log_p.sub_(log_q).mul_(p).sum(-1), group)
            torch.sub(log_q.exp_() if q is None else q, p, out=kl_dir)  # q - p
        else:  # reverse: KL(q || p)
            q = log_q.exp() if q is None else q
            diff = log_q.sub_(log_p)  # log q - log p
            kl_t = sum_tokens((q * diff).sum(-1), group)
            torch.mul(diff.sub_(kl_t[:, None]), q, out=kl_dir)
        if temperature != 1.0:
            kl_dir.div_(temperature)
    return kl_t, nll_t


def _whole_chunk_losses(s, t, labels_t, temperature: float, kind: str, nll_grad: bool):
    """(kl_t, nll_t, kl_dir, q1) of a whole chunk on one rank: `_block_losses`' per-row math
    written out of place, for torch.compile (`chunked_vocab_losses(compiled=True)`), which fuses
    the softmaxes, the KL and its gradient direction into a few passes over each row of logits
    and writes only the outputs (no [t, v] temporaries, so no row blocks are needed). A second
    copy of the formulas because `_block_losses` does not trace: its label gather is sized by
    `nonzero` (data-dependent) for the TP split, and it writes into preallocated buffers."""
    s = upcast(s)
    log_q1 = torch.log_softmax(s, dim=-1)
    nll_t = -log_q1.gather(-1, labels_t[:, None]).squeeze(-1)
    q1 = log_q1.exp() if nll_grad else None
    if t is None:
        return torch.zeros_like(nll_t), nll_t, None, q1
    t = upcast(t)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    log_q = log_q1 if temperature == 1.0 else torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    if kind == "forward":
        p = log_p.exp()
        kl_t = (p * (log_p - log_q)).sum(-1)
        kl_dir = log_q.exp() - p  # q - p
    else:  # reverse: KL(q || p)
        q = log_q.exp()
        diff = log_q - log_p
        kl_t = (q * diff).sum(-1)
        kl_dir = (diff - kl_t[:, None]) * q
    if temperature != 1.0:
        kl_dir = kl_dir / temperature
    return kl_t, nll_t, kl_dir, q1


@functools.cache
def _compiled_whole_chunk_losses():
    """`_whole_chunk_losses` compiled once per process (dynamic shapes: chunks of any size)."""
    return torch.compile(_whole_chunk_losses, dynamic=True)


class _VocabLosses(torch.autograd.Function):
    """(kl_t, nll_t) of one chunk; see the module docstring for the formulas."""

    @staticmethod
    def forward(
        ctx,
        student_tv: torch.Tensor,
        teacher_tv: torch.Tensor | None,
        labels_t: torch.Tensor,
        temperature: float,
        kind: str,
        nll_grad: bool,
        vocab_start: int,
        group,
        backward_once: bool,
        compiled: bool,
    ):
        if compiled and not parallel(group):
            kl_t, nll_t, kl_dir, q1 = _compiled_whole_chunk_losses()(
                student_tv, teacher_tv, labels_t, temperature, kind, nll_grad
            )
            save_for_student_grad(
                ctx, kl_dir, q1, labels_t, vocab_start, student_tv.dtype, backward_once
            )
            return kl_t, nll_t
        n, v = student_tv.shape
        buffer = dict(dtype=upcast(student_tv).dtype, device=student_tv.device)
        kl_dir = torch.empty(n, v, **buffer) if teacher_tv is not None else None
        q1 = torch.empty(n, v, **buffer) if nll_grad else None
        kl_t = torch.empty(n, **buffer)
        nll_t = torch.empty(n, **buffer)
        rows = max(1, ROW_BLOCK_ELEMENTS // max(v, 1))
        for a in range(0, n, rows):
            b = min(n, a + rows)
            kl_t[a:b], nll_t[a:b] = _block_losses(
                student_tv[a:b],
                None if teacher_tv is None else teacher_tv[a:b],
                labels_t[a:b],
                temperature,
                kind,
                nll_grad,
                vocab_start,
                group,
                None if kl_dir is None else kl_dir[a:b],
                None if q1 is None else q1[a:b],
            )
        save_for_student_grad(
            ctx, kl_dir, q1, labels_t, vocab_start, student_tv.dtype, backward_once
        )
        return kl_t, nll_t

    @staticmethod
    def backward(ctx, grad_kl_t: torch.Tensor, grad_nll_t: torch.Tensor):
        return (student_grad(ctx, grad_kl_t, grad_nll_t),) + (None,) * 9


def vocab_losses(
    student_tv: torch.Tensor,
    teacher_tv: torch.Tensor | None,
    labels_t: torch.Tensor,
    temperature: float = 1.0,
    kind: str = "forward",
    nll_grad: bool = False,
    vocab_start: int = 0,
    group=None,
    backward_once: bool = True,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL (zeros without a teacher) and student NLL of one chunk of logit slices.

    The KL carries a gradient; the NLL too when `nll_grad` (LM loss in the objective), else it is
    only for logging. Logits of padded vocabulary rows must be PAD_LOGIT already.
    `backward_once`: see vocab_parallel.save_for_student_grad. `compiled`: on one rank, the
    same math through torch.compile (`_whole_chunk_losses`); the TP-split path stays eager."""
    if kind not in ("forward", "reverse"):
        raise ValueError(f"kind must be forward or reverse, got {kind!r}")
    return _VocabLosses.apply(
        student_tv, teacher_tv, labels_t, temperature, kind, nll_grad, vocab_start, group,
        backward_once, compiled,
    )  # fmt: skip


def mask_padding(logits_tv: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """PAD_LOGIT in the columns of padded vocabulary rows (>= vocab_size) of this slice."""
    first_pad = vocab_size - vocab_start
    if first_pad >= logits_tv.shape[-1]:
        return logits_tv
    keep = torch.arange(logits_tv.shape[-1], device=logits_tv.device) < first_pad
    return torch.where(keep, logits_tv, torch.full_like(logits_tv, PAD_LOGIT))


def output_logits(
    hidden_th: torch.Tensor, weight_vh: torch.Tensor, vocab_size: int, vocab_start: int
) -> torch.Tensor:
    """A chunk's logit slice from final hidden states, padded vocabulary rows at PAD_LOGIT (the
    teacher cache computes the teacher's top K with this too, so they equal the online ones)."""
    return mask_padding(F.linear(hidden_th, weight_vh), vocab_size, vocab_start)


def _chunk(
    h_s: torch.Tensor,
    h_t: torch.Tensor | None,
    cached: TeacherTopK | None,
    labels_t: torch.Tensor,
    w_s: torch.Tensor,
    w_t: torch.Tensor | None,
    vocab_size: int,
    vocab_start: int,
    temperature: float,
    kind: str,
    top_k: int | None,
    nll_grad: bool,
    group,
    compiled: bool = False,
):
    student = output_logits(h_s, w_s, vocab_size, vocab_start)
    teacher = None
    if h_t is not None:
        with torch.no_grad():
            teacher = output_logits(h_t, w_t, vocab_size, vocab_start)
        if kind == "topk":
            cached, teacher = teacher_top_k(teacher, top_k, temperature, vocab_start, group), None
        elif teacher.shape[-1] != student.shape[-1]:  # other vocab paddings (one rank only)
            width = max(teacher.shape[-1], student.shape[-1])
            student, teacher = (
                F.pad(x, (0, width - x.shape[-1]), value=PAD_LOGIT) for x in (student, teacher)
            )
    if cached is not None:
        return top_k_losses(student, cached, labels_t, temperature, nll_grad, vocab_start, group)
    return vocab_losses(
        student, teacher, labels_t, temperature, kind, nll_grad, vocab_start, group,
        compiled=compiled,
    )  # fmt: skip


def chunked_vocab_losses(
    hidden_s_th: torch.Tensor,
    hidden_t_th: torch.Tensor | None,
    labels_t: torch.Tensor,
    weight_s_vh: torch.Tensor,
    weight_t_vh: torch.Tensor | None,
    vocab_size: int,
    vocab_start: int = 0,
    temperature: float = 1.0,
    kind: str = "forward",
    nll_grad: bool = False,
    chunk_tokens: int | None = None,
    group=None,
    top_k: int | None = None,
    cached: TeacherTopK | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (KL, NLL) [t] from final hidden states and output-layer weight slices, the
    logits made chunk by chunk. `hidden_s_th` must already be the input of a column-parallel
    linear (replicated over TP, its gradient all-reduced by the caller's mapping).

    kind "topk" is the KL against the teacher's top `top_k` tokens and tail (topk_loss.py),
    taken from the teacher's hidden states and output weight, or from `cached` (a teacher
    cache's rows for these tokens, in the same order) when there is no teacher. `compiled`:
    see `vocab_losses` (the top-K loss stays eager)."""
    if kind == "topk" and hidden_t_th is None and cached is None:
        raise ValueError("kind topk needs the teacher's hidden states or its cached top K")
    n = hidden_s_th.shape[0]
    chunk = chunk_tokens or n
    kl, nll = [], []
    for start in range(0, n, chunk):
        args = (
            hidden_s_th[start : start + chunk],
            None if hidden_t_th is None else hidden_t_th[start : start + chunk],
            None if cached is None else cached.rows(start, start + chunk),
            labels_t[start : start + chunk],
            weight_s_vh,
            weight_t_vh,
            vocab_size,
            vocab_start,
            temperature,
            kind,
            top_k,
            nll_grad,
            group,
            compiled,
        )
        if chunk < n and torch.is_grad_enabled():
            kl_c, nll_c = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            kl_c, nll_c = _chunk(*args)
        kl.append(kl_c)
        nll.append(nll_c)
    return torch.cat(kl), torch.cat(nll)
