"""Rank worker (2 ranks): vocab-parallel KL on half the vocab each == full KL on one rank.

usage: kd_loss_worker.py RESULT.json
"""

import json
import sys

import torch
import torch.distributed as dist


def main() -> None:
    from minitron_nemo.distill.losses import kl_divergence

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    s_full = torch.randn(10, 32, generator=g) * 3
    t_full = torch.randn(10, 32, generator=g) * 3
    result = {}
    for kind in ("forward", "reverse"):
        s_ref = s_full.clone().requires_grad_()
        ref = kl_divergence(s_ref, t_full, temperature=1.5, kind=kind)
        ref.backward()
        local = s_full.chunk(world, -1)[rank].clone().requires_grad_()
        loss = kl_divergence(local, t_full.chunk(world, -1)[rank], temperature=1.5, kind=kind,
                             chunk_size=3, group=dist.group.WORLD)
        loss.backward()
        grads = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(grads, local.grad)
        result[kind] = {
            "loss_err": abs(loss.item() - ref.item()),
            "grad_err": (torch.cat(grads, -1) - s_ref.grad).abs().max().item(),
        }
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
