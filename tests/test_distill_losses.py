"""KD losses against analytic values and direct formulas; gradients by gradcheck."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from minitron_nemo.distill.losses import (
    combine,
    dynamic_alpha,
    intermediate_loss,
    kl_divergence,
    top_k_forward_kl,
)
from minitron_nemo.runtime.forward import PAD_LOGIT
from tests.helpers import REPO, run_worker


def _logits(t=12, v=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, v, generator=g, dtype=dtype) * 2, torch.randn(
        t, v, generator=g, dtype=dtype
    ) * 2


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_identical_logits_give_zero(kind):
    s, _ = _logits()
    assert kl_divergence(s, s.clone(), kind=kind).abs().item() < 1e-12


def test_forward_kl_equals_torch_kl_div():
    s, t = _logits()
    expected = F.kl_div(
        s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    torch.testing.assert_close(kl_divergence(s, t), expected, rtol=1e-12, atol=1e-12)


def test_reverse_kl_against_direct_formula():
    s, t = _logits()
    p, log_p, log_q = s.softmax(-1), s.log_softmax(-1), t.log_softmax(-1)
    expected = (p * (log_p - log_q)).sum(-1).mean()
    torch.testing.assert_close(kl_divergence(s, t, kind="reverse"), expected)


def test_temperature_scaling():
    s, t = _logits()
    temp = 2.5
    expected = (
        F.kl_div(
            (s / temp).log_softmax(-1),
            (t / temp).log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
        * temp**2
    )
    torch.testing.assert_close(kl_divergence(s, t, temperature=temp), expected)


def test_chunked_equals_unchunked_values_and_grads():
    s, t = _logits(t=23)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    full = kl_divergence(s1, t)
    chunked = kl_divergence(s2, t, chunk_size=5)
    full.backward()
    chunked.backward()
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-10, atol=1e-14)


def test_masked_tokens_do_not_count():
    s, t = _logits()
    mask = torch.zeros(s.shape[0], dtype=torch.bool)
    mask[:5] = True
    torch.testing.assert_close(kl_divergence(s, t, mask_t=mask), kl_divergence(s[:5], t[:5]))


def test_padded_vocab_rows_change_nothing_and_grads_stay_finite():
    s, t = _logits(v=30)
    pad = torch.full((s.shape[0], 6), PAD_LOGIT, dtype=s.dtype)
    for kind in ("forward", "reverse"):
        sp = torch.cat([s, pad], -1).requires_grad_()
        loss = kl_divergence(sp, torch.cat([t, pad], -1), kind=kind)
        torch.testing.assert_close(loss, kl_divergence(s, t, kind=kind))
        loss.backward()
        assert torch.isfinite(sp.grad).all()


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck(kind, chunk):
    s, t = _logits(t=5, v=7)
    s.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: kl_divergence(x, t, temperature=1.7, kind=kind, chunk_size=chunk), (s,)
    )


def test_top_k_against_direct_formula_and_gradcheck():
    s, t = _logits(t=6, v=20)
    k = 4
    idx = t.topk(k, -1).indices
    log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
    p_top, q_top = log_p.exp().gather(-1, idx), log_q.exp().gather(-1, idx)
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    expected = (
        (p_top * (p_top.log() - q_top.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    ).mean()
    torch.testing.assert_close(top_k_forward_kl(s, t, k), expected)
    # A lower bound of the full forward KL; equal when the teacher has no tail (k = vocab).
    assert top_k_forward_kl(s, t, k) < kl_divergence(s, t)
    torch.testing.assert_close(top_k_forward_kl(s, t, 20), kl_divergence(s, t))
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: top_k_forward_kl(x, t, k, temperature=0.8), (s,))


def test_intermediate_losses():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(8, 6, generator=g, dtype=torch.float64)
    proj = torch.nn.Linear(6, 10, bias=False).double()
    teacher = proj(student).detach()
    assert intermediate_loss(student, teacher, proj, "cosine").abs().item() < 1e-12
    assert intermediate_loss(student, teacher, proj, "mse").abs().item() < 1e-24
    assert intermediate_loss(student, -teacher, proj, "cosine").item() == pytest.approx(2.0)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: intermediate_loss(x, teacher + 0.3, proj, "cosine"), (student,)
    )


def test_dynamic_alpha_balances_terms_and_is_detached():
    logits_loss = torch.tensor(3.0, requires_grad=True)
    inter = torch.tensor(0.5, requires_grad=True)
    total, logs = combine(logits_loss, inter, None, {}, dynamic=True)
    assert logs["alpha"] == pytest.approx(6.0)
    assert total.item() == pytest.approx(6.0)  # L_logits + alpha * L_is = 3 + 6 * 0.5
    total.backward()
    assert logits_loss.grad.item() == pytest.approx(1.0)  # alpha carries no gradient
    assert inter.grad.item() == pytest.approx(6.0)
    assert not dynamic_alpha(logits_loss, inter).requires_grad
    fixed, logs = combine(
        logits_loss, inter, torch.tensor(2.0), {"intermediate": 0.1, "lm": 0.5}, dynamic=False
    )
    assert fixed.item() == pytest.approx(3.0 + 0.05 + 1.0)


@pytest.mark.dist
def test_vocab_parallel_tp2_equals_tp1(tmp_path):
    run_worker(REPO / "tests/dist/kd_loss_worker.py", 2, str(tmp_path / "result.json"))
    result = json.loads((tmp_path / "result.json").read_text())
    for kind in ("forward", "reverse"):
        assert result[kind]["loss_err"] < 1e-6
        assert result[kind]["grad_err"] < 1e-6
