"""The fused vocabulary losses equal the reference formulas (values and gradients) at every
setting the trainer uses; gradients also by gradcheck; vocab-parallel over 2 ranks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from minitron_nemo.distill import vocab_loss
from minitron_nemo.distill.losses import kl_divergence
from minitron_nemo.distill.vocab_loss import chunked_vocab_losses, vocab_losses
from minitron_nemo.runtime.forward import PAD_LOGIT
from tests.helpers import REPO, run_worker


def _logits(t=13, v=37, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(t, v, generator=g, dtype=dtype) * 2
    teacher = torch.randn(t, v, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, v, (t,), generator=g)
    return s, teacher, labels


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("nll_grad", [False, True])
@pytest.mark.parametrize("block_rows", [None, 4, "whole"])
def test_fused_equals_reference_values_and_gradients(
    kind, temperature, nll_grad, block_rows, monkeypatch
):
    s, t, labels = _logits()
    if block_rows == "whole":  # distill.cpu_compile's out-of-place math (compiled in training)
        monkeypatch.setattr(
            vocab_loss, "_compiled_whole_chunk_losses", lambda: vocab_loss._whole_chunk_losses
        )
    elif block_rows:  # 13 rows reduced as blocks of 4, 4, 4, 1
        monkeypatch.setattr(vocab_loss, "ROW_BLOCK_ELEMENTS", block_rows * s.shape[1])
    s_ref, s_new = s.clone().requires_grad_(), s.clone().requires_grad_()
    kl_ref = kl_divergence(s_ref, t, temperature, kind)  # mean * T^2
    nll_ref = F.cross_entropy(s_ref, labels)
    kl_t, nll_t = vocab_losses(
        s_new, t, labels, temperature, kind, nll_grad, compiled=block_rows == "whole"
    )
    kl_new = kl_t.mean() * temperature**2
    torch.testing.assert_close(kl_new, kl_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(nll_t.mean(), nll_ref, rtol=1e-12, atol=1e-14)
    lm_weight = 0.7 if nll_grad else 0.0
    (kl_ref + lm_weight * nll_ref).backward()
    (kl_new + lm_weight * nll_t.mean()).backward()
    torch.testing.assert_close(s_new.grad, s_ref.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("whole", [False, True], ids=["rows", "whole"])
def test_nll_only_and_no_gradient_through_logging_nll(whole, monkeypatch):
    monkeypatch.setattr(
        vocab_loss, "_compiled_whole_chunk_losses", lambda: vocab_loss._whole_chunk_losses
    )
    s, _, labels = _logits()
    x = s.clone().requires_grad_()
    kl_t, nll_t = vocab_losses(x, None, labels, nll_grad=True, compiled=whole)
    assert torch.equal(kl_t, torch.zeros_like(kl_t))
    nll_t.mean().backward()
    torch.testing.assert_close(x.grad, F.softmax(s, -1).sub(F.one_hot(labels, 37)) / 13)
    y = s.clone().requires_grad_()
    kl_t, nll_t = vocab_losses(y, s.clone(), labels, nll_grad=False, compiled=whole)
    assert kl_t.abs().max() < 1e-12  # identical distributions
    kl_t.sum().backward()
    assert y.grad.abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_gradcheck(kind):
    s, t, labels = _logits(t=4, v=7)
    weights = torch.tensor([0.3, 1.1, 0.5, 0.9], dtype=torch.float64)

    def f(x):
        kl_t, nll_t = vocab_losses(x, t, labels, 1.7, kind, nll_grad=True, backward_once=False)
        return (kl_t * weights).sum() + (nll_t * weights.flip(0)).sum()

    assert torch.autograd.gradcheck(f, (s.clone().requires_grad_(),))


def test_training_backward_reuses_saved_buffers_and_refuses_a_second_backward():
    """By default the saved [t, v] buffers become the gradient in place; differentiating the
    same graph again is an error from autograd, not a gradient from overwritten values."""
    s, t, labels = _logits()
    x = s.clone().requires_grad_()
    kl_t, nll_t = vocab_losses(x, t, labels, 1.0, nll_grad=True)
    (kl_t.sum() + nll_t.sum()).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (kl_t.sum() + nll_t.sum()).backward()


def test_chunked_output_layer_equals_full_logits():
    """Logits made chunk by chunk from hidden states (recomputed in backward) equal the full
    logits path, for hidden states and the output weight; padded rows are excluded."""
    g = torch.Generator().manual_seed(3)
    t_tokens, h, v_padded, vocab = 23, 8, 40, 37
    h_s = torch.randn(t_tokens, h, generator=g, dtype=torch.float64)
    h_t = torch.randn(t_tokens, h, generator=g, dtype=torch.float64)
    w_s = torch.randn(v_padded, h, generator=g, dtype=torch.float64)
    w_t = torch.randn(v_padded, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (t_tokens,), generator=g)
    results = []
    for chunk in (None, 5):
        hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        kl_t, nll_t = chunked_vocab_losses(
            hs, h_t, labels, ws, w_t, vocab, nll_grad=True, chunk_tokens=chunk
        )
        (kl_t.mean() + 0.5 * nll_t.mean()).backward()
        results.append((kl_t, nll_t, hs.grad, ws.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    # Against the reference on unpadded logits.
    s_ref = (h_s @ w_s.T)[:, :vocab].requires_grad_()
    ref = kl_divergence(s_ref, (h_t @ w_t.T)[:, :vocab]) + 0.5 * F.cross_entropy(s_ref, labels)
    torch.testing.assert_close(results[0][0].mean() + 0.5 * results[0][1].mean(), ref)
    ref.backward()
    torch.testing.assert_close(results[0][3][:vocab], (s_ref.grad.T @ h_s))
    assert results[0][3][vocab:].abs().max() == 0  # padded rows get no gradient


def test_pad_logits_stay_finite():
    s, t, labels = _logits(dtype=torch.float32)
    s[:, -3:] = PAD_LOGIT
    t[:, -3:] = PAD_LOGIT
    x = s.clone().requires_grad_()
    kl_t, nll_t = vocab_losses(x, t, labels.clamp(max=33), nll_grad=True)
    (kl_t.mean() + nll_t.mean()).backward()
    assert torch.isfinite(kl_t).all() and torch.isfinite(x.grad).all()
    assert x.grad[:, -3:].abs().max() == 0


@pytest.mark.dist
def test_vocab_parallel_two_ranks_equal_one(tmp_path):
    out = tmp_path / "result.json"
    run_worker(REPO / "tests/dist/vocab_loss_worker.py", 2, str(out))
    result = json.loads(out.read_text())
    assert len(result) == 4  # forward / reverse, each in one block and in blocks of 3 rows
    for kind, errs in result.items():
        assert errs["kl_err"] < 1e-6 and errs["nll_err"] < 1e-6, (kind, errs)
        assert errs["grad_err"] < 1e-6, (kind, errs)
