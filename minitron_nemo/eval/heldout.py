"""Held-out LM loss / perplexity of megatron checkpoints, computed by megatron-core on the run's
ranks (TP x PP x DP, experts split over EP of the DP ranks; GPU when present), batched.

Every rank reads its data-parallel share of the test view's micro-batches itself (ranks receive
paths); the pipeline schedule runs them forward; summed token losses and counts are all-reduced
over pipeline and data-parallel ranks. Several models are evaluated in one launch, one after the
other, each loaded at the run's TP/PP/EP from a checkpoint saved at any TP/PP/EP. With EP > 1
every MoE layer exchanges tokens with the other ranks of its expert group, so every rank runs
the same number of forwards: a rank with fewer micro-batches than the others repeats its first
one and does not count it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_nemo.data.datasets import DataSpec
from minitron_nemo.runtime.launch import run_on_ranks


def _heldout_on_rank(
    models: dict[str, str],
    data: DataSpec,
    micro_batch: int,
    tp: int,
    pp: int,
    ep: int,
    out: Path,
) -> None:
    from megatron.core import parallel_state

    from minitron_nemo import checkpoint
    from minitron_nemo.data.datasets import heldout_indices, heldout_reader
    from minitron_nemo.runtime import distributed
    from minitron_nemo.runtime.forward import run_forward, same_shape_runs, token_losses

    with distributed.initialize(tp=tp, pp=pp, ep=ep) as ctx:
        reader = heldout_reader(data)
        indices = heldout_indices(data)
        chunks = [indices[i : i + micro_batch] for i in range(0, len(indices), micro_batch)]
        mine = chunks[ctx.dp_rank :: ctx.dp]
        rounds = -(-len(chunks) // ctx.dp) if ep > 1 else len(mine)
        counted = [True] * len(mine) + [False] * (rounds - len(mine))
        mine += [chunks[0]] * (rounds - len(mine))
        results = {}
        for name, ckpt in models.items():
            model, arch = checkpoint.load_model(Path(ckpt))
            total = torch.zeros(2, dtype=torch.float64, device=ctx.device)

            weights = iter(counted)  # the last stage sees the outputs in micro-batch order

            def on_output(logits_bsv, batch, arch=arch, weights=weights):
                losses = token_losses(logits_bsv, batch[:, 1:], arch.vocab_size)
                count = torch.tensor(float(losses.numel()), dtype=torch.float64)
                pair = torch.stack([losses.sum().double(), count.to(losses.device)])
                return pair if next(weights) else torch.zeros_like(pair)

            batches = [reader.read(b).to(ctx.device) for b in mine]
            for group in same_shape_runs(batches):
                for out_pair in run_forward(model, group, on_output):
                    total += out_pair.to(total)
            for group_handle in (
                parallel_state.get_pipeline_model_parallel_group() if ctx.pp > 1 else None,
                parallel_state.get_data_parallel_group() if ctx.dp > 1 else None,
            ):
                if group_handle is not None:
                    dist.all_reduce(total, group=group_handle)
            loss = (total[0] / total[1]).item()
            results[name] = {
                "heldout_loss": loss,
                "heldout_ppl": math.exp(loss),
                "heldout_tokens": int(total[1].item()),
                "params": arch.num_parameters(),
            }
            del model
        if ctx.rank == 0:
            out.write_text(json.dumps(results, indent=2))


def heldout_losses(
    models: dict[str, Path],
    data: DataSpec,
    out: Path,
    micro_batch: int = 4,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    ep: int = 1,
) -> dict[str, dict]:
    """{model: heldout_loss, heldout_ppl, heldout_tokens, params} for megatron checkpoints."""
    from minitron_nemo.data.datasets import build_indices

    build_indices(data, ("test",))  # a no-op after the data stage
    run_on_ranks(
        _heldout_on_rank,
        tp * pp * dp,
        {k: str(v) for k, v in models.items()},
        data,
        micro_batch,
        tp,
        pp,
        ep,
        out,
    )
    return json.loads(out.read_text())
