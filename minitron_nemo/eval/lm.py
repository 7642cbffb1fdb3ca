"""Held-out LM loss of an HF directory (transformers forward, no megatron needed)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def load_hf_model(hf_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()


@torch.no_grad()
def heldout_loss(model, samples: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross entropy over samples [n, s+1] (every token weighs the same)."""
    total, count = 0.0, 0
    for i in range(0, samples.shape[0], batch_size):
        batch = samples[i : i + batch_size]
        logits = model(batch[:, :-1]).logits.float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


def heldout_metrics(hf_dir: Path, samples: torch.Tensor) -> dict[str, float]:
    loss = heldout_loss(load_hf_model(hf_dir), samples)
    return {"loss": loss, "ppl": math.exp(loss)}
