"""Rank worker (2 ranks): fused vocab losses on half the vocabulary each == one rank, with
each rank's rows reduced in one block and in blocks of 3 rows (collectives per block).

usage: vocab_loss_worker.py RESULT.json
"""

import json
import sys

import torch
import torch.distributed as dist


def main() -> None:
    from minitron_nemo.distill import vocab_loss
    from minitron_nemo.distill.vocab_loss import vocab_losses

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    s_full = torch.randn(10, 32, generator=g) * 3
    t_full = torch.randn(10, 32, generator=g) * 3
    labels = torch.randint(0, 32, (10,), generator=g)
    result = {}
    one_block = vocab_loss.ROW_BLOCK_ELEMENTS
    for kind, block_rows in (("forward", None), ("reverse", None), ("forward", 3), ("reverse", 3)):
        # 10 rows of 16 columns per rank: one block, or blocks of 3, 3, 3, 1 rows
        vocab_loss.ROW_BLOCK_ELEMENTS = block_rows * (32 // world) if block_rows else one_block
        s_ref = s_full.clone().requires_grad_()
        kl_ref, nll_ref = vocab_losses(s_ref, t_full, labels, 1.5, kind, nll_grad=True)
        (kl_ref.mean() + 0.3 * nll_ref.mean()).backward()
        width = 32 // world
        local = s_full[:, rank * width : (rank + 1) * width].clone().requires_grad_()
        kl, nll = vocab_losses(
            local, t_full[:, rank * width : (rank + 1) * width], labels, 1.5, kind,
            nll_grad=True, vocab_start=rank * width, group=dist.group.WORLD,
        )  # fmt: skip
        (kl.mean() + 0.3 * nll.mean()).backward()
        grads = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(grads, local.grad)
        result[f"{kind}, rows per block {block_rows or 'all'}"] = {
            # relative to the largest value (fp32 sums in another order on two ranks)
            "kl_err": ((kl - kl_ref).abs().max() / kl_ref.abs().max()).item(),
            "nll_err": ((nll - nll_ref).abs().max() / nll_ref.abs().max()).item(),
            "grad_err": ((torch.cat(grads, -1) - s_ref.grad).abs().max() / s_ref.grad.abs().max()).item(),
        }
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
