"""Baseline unit selections to compare importance against: random and weight magnitude."""

from __future__ import annotations

import torch

from minitron_nemo.models.arch import ModelArch


def random_scores(source: ModelArch, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "heads": torch.rand(
            source.num_layers, source.num_attention_heads, generator=gen, dtype=torch.double
        ),
        "neurons": torch.rand(
            source.num_layers, source.ffn_hidden_size, generator=gen, dtype=torch.double
        ),
        "channels": torch.rand(source.hidden_size, generator=gen, dtype=torch.double),
    }


def magnitude_scores(state: dict[str, torch.Tensor], source: ModelArch) -> dict[str, torch.Tensor]:
    """L2 norm of each unit's weights: neuron = its gate/up rows and down column; head = its
    q rows and o_proj columns; channel = its embedding column."""
    d = source.head_dim
    heads, neurons = [], []
    for i in range(source.num_layers):
        p = f"model.layers.{i}."
        q = state[p + "self_attn.q_proj.weight"].double().view(source.num_attention_heads, d, -1)
        o = state[p + "self_attn.o_proj.weight"].double().view(-1, source.num_attention_heads, d)
        heads.append((q.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))).sqrt())
        gate = state[p + "mlp.gate_proj.weight"].double()
        up = state[p + "mlp.up_proj.weight"].double()
        down = state[p + "mlp.down_proj.weight"].double()
        neurons.append((gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt())
    channels = state["model.embed_tokens.weight"].double().norm(dim=0)
    return {"heads": torch.stack(heads), "neurons": torch.stack(neurons), "channels": channels}
