"""Forward passes through a (TP/PP-sharded) megatron model via megatron's pipeline schedule.

Shapes: b = micro-batch, s = sequence, v = padded vocab, v/tp = this rank's vocab slice.
A micro-batch of samples is [b, s + 1]: inputs are [:, :-1], next-token labels [:, 1:].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


def position_ids(tokens_bs: torch.Tensor) -> torch.Tensor:
    b, s = tokens_bs.shape
    return torch.arange(s, device=tokens_bs.device).unsqueeze(0).expand(b, s)


PAD_LOGIT = -1e30
"""Logit given to padded vocabulary rows: exp() is exactly 0 like -inf, yet finite, so
0 * log-prob terms and their gradients stay 0 instead of NaN."""


def mask_vocab_padding(logits_bsv: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of padded vocabulary rows (>= vocab_size) on this TP rank to PAD_LOGIT,
    so softmaxes and losses equal those of the unpadded HF model."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local_v = logits_bsv.shape[-1]
    start = tp_rank * local_v
    first_pad = vocab_size - start
    if first_pad >= local_v:
        return logits_bsv
    keep = torch.arange(local_v, device=logits_bsv.device) < first_pad
    return torch.where(keep, logits_bsv, torch.full_like(logits_bsv, PAD_LOGIT))


def _run_schedule(
    model: torch.nn.Module,
    microbatches: Sequence[torch.Tensor],
    output_fn: Callable[[torch.Tensor], Callable],
    forward_only: bool,
    **model_kwargs,
) -> list[object]:
    """Every micro-batch [b, s+1] through megatron's pipeline schedule; `output_fn(batch)` is
    the schedule's function of the last stage's output (loss or collected data)."""
    b, s_plus_1 = microbatches[0].shape

    def step(data_iterator, model_chunk):
        batch = next(data_iterator)
        tokens = batch[:, :-1]
        out = model_chunk(tokens, position_ids(tokens), attention_mask=None, **model_kwargs)
        return out, output_fn(batch)

    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=s_plus_1 - 1,
        micro_batch_size=b,
        forward_only=forward_only,
        collect_non_loss_data=forward_only,
    )


def same_shape_runs(batches: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive micro-batches of one shape: the schedule needs one shape per call (a short
    last batch, or a full one after it, runs in a call of its own)."""
    runs: list[list[torch.Tensor]] = []
    for batch in batches:
        if runs and runs[-1][0].shape == batch.shape:
            runs[-1].append(batch)
        else:
            runs.append([batch])
    return runs


def run_forward(
    model: torch.nn.Module,
    microbatches: Sequence[torch.Tensor],
    on_output: Callable[[torch.Tensor, torch.Tensor], object],
    **model_kwargs,
) -> list[object]:
    """Forward every micro-batch [b, s+1] through the pipeline (no grad).

    `on_output(logits_bsv_local, microbatch)` runs on the last stage; its results are returned
    there (an empty list on other stages). `model_kwargs` go to the model's forward (e.g.
    megatron's `output_processor`, which changes what the last stage outputs).
    """
    model.eval()

    def collect(batch):
        return lambda output, non_loss_data=False: on_output(output, batch)

    with torch.no_grad():
        return _run_schedule(model, microbatches, collect, forward_only=True, **model_kwargs)


def run_loss_backward(
    model: torch.nn.Module,
    microbatches: Sequence[torch.Tensor],
    vocab_size: int,
    loss_scale: float = 1.0,
) -> None:
    """Forward and backward of the mean next-token loss of each micro-batch [b, s+1] (times
    `loss_scale`) through the pipeline, parameters frozen: only activation gradients flow (read
    them with tensor hooks, e.g. the taylor head importance). Eval mode (no dropout)."""
    from contextlib import ExitStack

    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    with ExitStack() as stack:
        for p in frozen:
            p.requires_grad_(False)
        stack.callback(lambda: [p.requires_grad_(True) for p in frozen])
        # With frozen weights the first stage's embedding output would not need a gradient.
        if parallel_state.is_pipeline_first_stage():
            handle = model.embedding.register_forward_hook(
                lambda _m, _a, out: out.detach().requires_grad_(True)
            )
            stack.callback(handle.remove)

        def mean_loss(batch):
            def loss(logits_bsv):
                value = token_losses(logits_bsv, batch[:, 1:], vocab_size).mean() * loss_scale
                return value, {"loss": value.detach()}

            return loss

        _run_schedule(model, microbatches, mean_loss, forward_only=False)


def forward_logits(model: torch.nn.Module, tokens_bs: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, padded_v] on the last pipeline stage, None on others.

    Every rank passes the same tokens; logits are gathered across the TP group.
    """
    padded = torch.cat([tokens_bs, tokens_bs[:, -1:]], dim=1)  # dummy label column
    outputs = run_forward(
        model, [padded], lambda out, _batch: gather_from_tensor_model_parallel_region(out)
    )
    return outputs[0] if parallel_state.is_pipeline_last_stage() else None


def token_losses(
    logits_bsv: torch.Tensor, labels_bs: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Per-token cross entropy [b, s], vocab-parallel over TP, padded rows excluded."""
    logits_sbv = mask_vocab_padding(logits_bsv, vocab_size).transpose(0, 1).float().contiguous()
    return tensor_parallel.vocab_parallel_cross_entropy(
        logits_sbv, labels_bs.transpose(0, 1).contiguous()
    ).transpose(0, 1)


def lm_loss(
    model: torch.nn.Module, samples: torch.Tensor, vocab_size: int, micro_batch_size: int = 1
) -> float:
    """Mean next-token cross entropy over samples [n, s+1]; the same value on every rank."""
    device = next(model.parameters()).device
    batches = [
        samples[i : i + micro_batch_size].to(device)
        for i in range(0, samples.shape[0], micro_batch_size)
    ]

    def on_output(logits_bsv, batch):
        losses = token_losses(logits_bsv, batch[:, 1:], vocab_size)
        count = torch.tensor(float(losses.numel()), dtype=torch.double, device=losses.device)
        return torch.stack([losses.sum().double(), count])

    outputs = [
        out for run in same_shape_runs(batches) for out in run_forward(model, run, on_output)
    ]
    total = torch.zeros(2, dtype=torch.double, device=device)
    if parallel_state.is_pipeline_last_stage():
        total += torch.stack(outputs).sum(0).to(device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return (total[0] / total[1]).item()
