"""The fused top-K + tail KL (distill/topk_loss.py) equals the autograd reference formula
(values and gradients), its teacher side is right, and two vocab-parallel ranks equal one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from minitron_nemo.distill.losses import top_k_forward_kl
from minitron_nemo.distill.topk_loss import TeacherTopK, teacher_top_k, top_k_losses
from minitron_nemo.distill.vocab_loss import chunked_vocab_losses
from tests.helpers import REPO, run_worker


def _logits(t=13, v=37, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(t, v, generator=g, dtype=dtype) * 2
    teacher = torch.randn(t, v, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, v, (t,), generator=g)
    return s, teacher, labels


def test_teacher_top_k_is_the_top_k_and_the_rest():
    _, t, _ = _logits()
    top = teacher_top_k(t, 5, temperature=1.5)
    log_p = (t / 1.5).log_softmax(-1)
    assert torch.equal(top.ids, t.topk(5, -1).indices)
    torch.testing.assert_close(top.logp, log_p.gather(-1, top.ids), rtol=1e-12, atol=1e-14)
    tail = 1 - top.logp.exp().sum(-1)
    torch.testing.assert_close(top.log_tail.exp(), tail, rtol=1e-10, atol=1e-14)
    assert torch.equal(teacher_top_k(t, 37).log_tail, torch.full((13,), float("-inf")).double())


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("nll_grad", [False, True])
def test_fused_equals_reference_values_and_gradients(temperature, nll_grad):
    s, t, labels = _logits()
    s_ref, s_new = s.clone().requires_grad_(), s.clone().requires_grad_()
    kl_ref = top_k_forward_kl(s_ref, t, 6, temperature)  # mean * T^2
    nll_ref = F.cross_entropy(s_ref, labels)
    kl_t, nll_t = top_k_losses(s_new, teacher_top_k(t, 6, temperature), labels, temperature,
                               nll_grad)  # fmt: skip
    kl_new = kl_t.mean() * temperature**2
    torch.testing.assert_close(kl_new, kl_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(nll_t.mean(), nll_ref, rtol=1e-12, atol=1e-14)
    lm_weight = 0.7 if nll_grad else 0.0
    (kl_ref + lm_weight * nll_ref).backward()
    (kl_new + lm_weight * nll_t.mean()).backward()
    torch.testing.assert_close(s_new.grad, s_ref.grad, rtol=1e-10, atol=1e-13)


def test_gradcheck_and_no_teacher_tail():
    s, t, labels = _logits(t=4, v=9)
    top = teacher_top_k(t, 3, 1.3)
    weights = torch.tensor([0.3, 1.1, 0.5, 0.9], dtype=torch.float64)

    def f(x, teacher=top):
        kl_t, nll_t = top_k_losses(x, teacher, labels, 1.3, nll_grad=True, backward_once=False)
        return (kl_t * weights).sum() + (nll_t * weights.flip(0)).sum()

    assert torch.autograd.gradcheck(f, (s.clone().requires_grad_(),))
    # K = vocabulary: no tail; the loss is the full forward KL and its gradient q - p.
    x = s.clone().requires_grad_()
    kl_t, _ = top_k_losses(x, teacher_top_k(t, 9), labels)
    kl_t.sum().backward()
    torch.testing.assert_close(x.grad, s.softmax(-1) - t.softmax(-1))


def test_bf16_values_are_renormalised():
    """Rounded cache values: the K + 1 buckets are renormalised, the loss stays close."""
    s, t, labels = _logits(dtype=torch.float32)
    exact = teacher_top_k(t, 8)
    rounded = TeacherTopK(exact.logp.bfloat16(), exact.ids.int(), exact.log_tail)
    kl_exact, _ = top_k_losses(s, exact, labels)
    kl_rounded, _ = top_k_losses(s, rounded, labels)
    assert (kl_rounded - kl_exact).abs().max() < 2e-2 * kl_exact.abs().max()
    assert torch.isfinite(kl_rounded).all()


def test_chunked_cached_equals_online_top_k():
    """chunked_vocab_losses from cached top-K rows == from the teacher's hidden states."""
    g = torch.Generator().manual_seed(3)
    n, h, v_padded, vocab = 23, 8, 40, 37
    h_s = torch.randn(n, h, generator=g, dtype=torch.float64)
    h_t = torch.randn(n, h, generator=g, dtype=torch.float64)
    w_s = torch.randn(v_padded, h, generator=g, dtype=torch.float64)
    w_t = torch.randn(v_padded, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=g)
    t_logits = (h_t @ w_t.T)[:, :vocab]
    cached = teacher_top_k(t_logits, 5, 1.5)
    results = []
    for teacher, cache in ((h_t, None), (None, cached)):
        hs = h_s.clone().requires_grad_()
        kl_t, nll_t = chunked_vocab_losses(
            hs, teacher, labels, w_s, w_t, vocab, temperature=1.5, kind="topk",
            nll_grad=True, chunk_tokens=5, top_k=5, cached=cache,
        )  # fmt: skip
        (kl_t.mean() + 0.5 * nll_t.mean()).backward()
        results.append((kl_t, nll_t, hs.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    ref = top_k_forward_kl((h_s @ w_s.T)[:, :vocab], t_logits, 5, 1.5) / 1.5**2
    torch.testing.assert_close(results[0][0].mean(), ref)


@pytest.mark.dist
def test_vocab_parallel_two_ranks_equal_one(tmp_path):
    out = tmp_path / "result.json"
    run_worker(REPO / "tests/dist/topk_loss_worker.py", 2, str(out))
    errs = json.loads(out.read_text())
    assert errs["ids_equal"]
    for name in ("logp_err", "tail_err", "kl_err", "nll_err", "grad_err"):
        assert errs[name] < 1e-6, (name, errs)
