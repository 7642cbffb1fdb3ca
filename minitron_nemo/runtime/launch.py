"""Run a function on N local ranks (a world of one runs in this process)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from minitron_nemo.runtime import cpu_compat
from minitron_nemo.runtime.distributed import free_port


def _rank_entry(
    local_rank: int, fn: Callable[..., Any], nprocs: int, port: int, args: tuple
) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if not cpu_compat.cuda_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    fn(*args)


def run_on_ranks(fn: Callable[..., Any], nprocs: int, *args: Any) -> None:
    """Call `fn(*args)` on `nprocs` ranks; they find each other through env:// on localhost.

    `fn` must be importable (module level): ranks are started with the spawn method.
    """
    if nprocs == 1 and "WORLD_SIZE" not in os.environ:
        fn(*args)
        return
    mp.start_processes(
        _rank_entry, args=(fn, nprocs, free_port(), args), nprocs=nprocs, start_method="spawn"
    )
