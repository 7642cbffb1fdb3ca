"""Depth importance: LM loss with a layer (or a contiguous block) skipped, and selection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from minitron_nemo.runtime.forward import lm_loss
from minitron_nemo.runtime.progress import Progress


@contextlib.contextmanager
def skip_layers(model: torch.nn.Module, layers: set[int]) -> Iterator[None]:
    """Make the given global layer indices identity functions on this rank's stage."""
    patched = []
    for layer in model.decoder.layers:
        if layer.layer_number - 1 in layers:
            layer.forward = lambda *args, **kwargs: (  # noqa: B023 - no loop state used
                kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                kwargs.get("context"),
            )
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


def layer_skip_losses(
    model: torch.nn.Module, samples: torch.Tensor, num_layers: int, vocab_size: int, mbs: int
) -> list[float]:
    """LM loss of the model with layer i skipped, for every i (one pass per layer)."""
    bar = Progress(num_layers, "depth: skip each layer")
    losses = []
    for i in range(num_layers):
        with skip_layers(model, {i}):
            losses.append(lm_loss(model, samples, vocab_size, mbs))
        bar.update(1)
    bar.close()
    return losses


def block_losses(
    model: torch.nn.Module,
    samples: torch.Tensor,
    num_layers: int,
    block: int,
    vocab_size: int,
    mbs: int,
) -> list[float]:
    """LM loss with the contiguous block [i, i + block) skipped, for every start i."""
    starts = range(num_layers - block + 1)
    bar = Progress(len(starts), f"depth: skip each block of {block}")
    losses = []
    for i in starts:
        with skip_layers(model, set(range(i, i + block))):
            losses.append(lm_loss(model, samples, vocab_size, mbs))
        bar.update(1)
    bar.close()
    return losses


def best_block(losses: list[float], block: int) -> list[int]:
    """Layers of the contiguous block whose removal hurts the LM loss least."""
    start = min(range(len(losses)), key=lambda i: (losses[i], i))
    return list(range(start, start + block))


def least_important(scores: list[float], k: int) -> list[int]:
    """The k layers with the lowest scores (ties: lower index first), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:k])
