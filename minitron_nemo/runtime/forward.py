"""Forward passes through a (TP/PP-sharded) megatron model via megatron's pipeline schedule."""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


def _position_ids(tokens_bs: torch.Tensor) -> torch.Tensor:
    b, s = tokens_bs.shape
    return torch.arange(s, device=tokens_bs.device).unsqueeze(0).expand(b, s)


def forward_logits(model: torch.nn.Module, tokens_bs: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, padded_v] on the last pipeline stage, None on others.

    Every rank passes the same tokens; logits are gathered across the TP group.
    """
    model.eval()
    b, s = tokens_bs.shape

    def step(data_iterator, model_chunk):
        tokens = next(data_iterator)
        out = model_chunk(tokens, _position_ids(tokens), attention_mask=None)

        def collect(output, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output)

        return out, partial(collect)

    forward_backward = get_forward_backward_func()
    with torch.no_grad():
        outputs = forward_backward(
            forward_step_func=step,
            data_iterator=iter([tokens_bs]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return outputs[0]
