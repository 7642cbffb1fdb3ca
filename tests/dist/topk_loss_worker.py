"""Rank worker (2 ranks): the top-K + tail KL on half the vocabulary each == one rank.

usage: topk_loss_worker.py RESULT.json
"""

import json
import sys

import torch
import torch.distributed as dist


def main() -> None:
    from minitron_nemo.distill.topk_loss import teacher_top_k, top_k_losses

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    s_full = torch.randn(10, 32, generator=g) * 3
    t_full = torch.randn(10, 32, generator=g) * 3
    labels = torch.randint(0, 32, (10,), generator=g)
    ref_top = teacher_top_k(t_full, 6, 1.5)
    s_ref = s_full.clone().requires_grad_()
    kl_ref, nll_ref = top_k_losses(s_ref, ref_top, labels, 1.5, nll_grad=True)
    (kl_ref.mean() + 0.3 * nll_ref.mean()).backward()
    width = 32 // world
    cols = slice(rank * width, (rank + 1) * width)
    top = teacher_top_k(t_full[:, cols], 6, 1.5, rank * width, dist.group.WORLD)
    local = s_full[:, cols].clone().requires_grad_()
    kl, nll = top_k_losses(local, top, labels, 1.5, nll_grad=True, vocab_start=rank * width,
                           group=dist.group.WORLD)  # fmt: skip
    (kl.mean() + 0.3 * nll.mean()).backward()
    grads = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(grads, local.grad)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    result = {
        "ids_equal": bool(torch.equal(top.ids, ref_top.ids)),
        "logp_err": rel(top.logp, ref_top.logp),
        "tail_err": rel(top.log_tail, ref_top.log_tail),
        "kl_err": rel(kl, kl_ref),
        "nll_err": rel(nll, nll_ref),
        "grad_err": rel(torch.cat(grads, -1), s_ref.grad),
    }
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
