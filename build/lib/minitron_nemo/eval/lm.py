"""Held-out LM loss of an HF directory (transformers forward, no megatron needed)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F


def load_hf_model(hf_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()


@torch.no_grad()
def heldout_loss(model, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token cross entropy over batches of samples [b, s+1] (every token weighs the
    same); batches are read one at a time."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(batch[:, :-1]).logits.float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count
