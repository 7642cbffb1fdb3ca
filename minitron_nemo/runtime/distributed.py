"""One place that starts and stops torch.distributed + megatron parallel state.

Usage::

    with distributed.initialize(tp=2, pp=1) as ctx:
        ...  # ctx.rank, ctx.tp_rank, ctx.device

Launched by torchrun the usual env (RANK, WORLD_SIZE, MASTER_ADDR, ...) is used; ranks started
by `runtime.launch` meet at the store their launcher serves (MINITRON_STORE_PORT), each
initialisation under its own key prefix; a plain `python` process becomes a world of one with
an in-memory store (no port). Backend: nccl with CUDA, gloo otherwise. On an exception the
process group is aborted so peers fail fast instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minitron_nemo.errors import MinitronError
from minitron_nemo.runtime import cpu_compat

STORE_PORT_ENV = "MINITRON_STORE_PORT"
"""Port of the key-value store served on MASTER_ADDR by the process that started the ranks."""

_initializations = 0
"""Process groups this process has started (every rank starts them in the same order, so the
count names the same rendezvous on each)."""


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the TP x PP x DP grid."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def free_port() -> int:
    """A TCP port that is free on localhost right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _device(local_rank: int) -> torch.device:
    if cpu_compat.cuda_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextlib.contextmanager
def initialize(
    tp: int = 1, pp: int = 1, seed: int = 1234, ep: int = 1
) -> Iterator[ParallelContext]:
    """Initialise torch.distributed and megatron parallel state; tear both down on exit.
    `ep` (expert parallel size: MoE experts split over ranks of the data-parallel dimension)
    must divide the data-parallel size."""
    from megatron.core import parallel_state, tensor_parallel

    cpu_compat.install()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % (tp * pp) != 0:
        raise MinitronError(
            f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel "
            f"= {tp} x {pp}"
        )
    if (world_size // (tp * pp)) % ep:
        raise MinitronError(
            f"expert parallel size {ep} must divide the data-parallel size "
            f"{world_size // (tp * pp)} (world {world_size} / (tp {tp} x pp {pp}))"
        )
    device = _device(local_rank)
    owns_group = not dist.is_initialized()
    # init_process_group wraps sys.excepthook to prefix "[rankN]: "; every init would wrap it
    # again, so a process that runs several stages would print "[rank0]: [rank0]: ...".
    excepthook = sys.excepthook
    if owns_group:
        timeout = datetime.timedelta(minutes=30)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            store=_rendezvous_store(world_size, timeout),
        )
    failed = False
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
        )
        # On CPU this uses cpu_compat's tracker (CPU generator states, see there).
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)
        yield ParallelContext(
            rank=rank,
            world_size=world_size,
            tp=tp,
            pp=pp,
            dp=world_size // (tp * pp),
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            dp_rank=parallel_state.get_data_parallel_rank(),
            device=device,
        )
    except BaseException:
        failed = True
        raise
    finally:
        parallel_state.destroy_model_parallel()
        if owns_group and dist.is_initialized():
            if failed and world_size > 1:
                _abort_process_group()
            else:
                dist.destroy_process_group()
                sys.excepthook = excepthook


def _rendezvous_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Where the ranks meet: the launcher's store (a fresh key prefix per initialisation, so a
    job that initialises twice never reads the first one's keys), an in-memory store for a
    world of one, or None (torchrun's env:// rendezvous at MASTER_ADDR:MASTER_PORT)."""
    global _initializations
    port = os.environ.get(STORE_PORT_ENV)
    if port is not None:
        _initializations += 1
        client = dist.TCPStore(
            os.environ.get("MASTER_ADDR", "127.0.0.1"), int(port), is_master=False, timeout=timeout
        )
        return dist.PrefixStore(f"init{_initializations}", client)
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        return dist.HashStore()
    if "MASTER_PORT" not in os.environ:
        raise MinitronError("MASTER_PORT is not set for a multi-process run (use torchrun)")
    return None


def _abort_process_group() -> None:
    """Abort communicators so peers blocked in a collective fail instead of hanging."""
    from torch.distributed import distributed_c10d

    try:
        distributed_c10d._abort_process_group()  # no public API for this in torch 2.14
    except Exception:  # noqa: BLE001 - best effort while already failing
        dist.destroy_process_group()
