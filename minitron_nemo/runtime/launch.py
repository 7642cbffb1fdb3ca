"""Run a function on N ranks.

By default the ranks are local processes (a world of one runs in this process); they meet at a
key-value store that this process serves on a port the OS picked. Without CUDA they are forked
from a forkserver that has imported torch, megatron-core and our rank functions once
(`cpu_compat.rank_start_method`): a launch after the first then starts in 0.1 s instead of
~7 s on 2 cores, which counts for every stage of a `minitron run` and every multi-process
test. Each rank gets this process's environment, working directory and stdout / stderr as they
are at the launch, as a spawned rank does. With CUDA, or MINITRON_START_METHOD=spawn, ranks
are spawned.

With MINITRON_LAUNCHER set, ranks are started by torchrun instead, prefixed by that command for
multi-node jobs, e.g. under Slurm
``MINITRON_LAUNCHER="srun --nodes={nodes} --relative=0 --ntasks-per-node=1"`` with
MINITRON_PROCS_PER_NODE=8 (GPUs per node) and MINITRON_RDZV_ENDPOINT=<first node>:29500: a
stage of N ranks uses ceil(N / 8) nodes, one torchrun each, with a c10d rendezvous;
``MINITRON_LAUNCHER=torchrun`` runs torchrun on this node only. The job (function + arguments)
travels as a pickle file in MINITRON_JOB_DIR (default: the current directory; it must be on a
filesystem every node sees).
"""

from __future__ import annotations

import os
import pickle
import shlex
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from multiprocessing import reduction
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minitron_nemo.errors import MinitronError, Stopped
from minitron_nemo.runtime import cpu_compat
from minitron_nemo.runtime.distributed import STORE_PORT_ENV, free_port
from minitron_nemo.runtime.preemption import forward_signals

RANK_PRELOAD = [
    "torch",
    "megatron.core",
    "minitron_nemo.convert.hf_to_mcore",
    "minitron_nemo.distill.teacher_cache",
    "minitron_nemo.distill.train",
    "minitron_nemo.eval.heldout",
    "minitron_nemo.prune.shard_slice",
    "minitron_nemo.prune.stage",
]
"""Modules the forkserver imports before it forks a rank: those of every function passed to
`run_on_ranks` here, which import megatron-core's model, optimizer and checkpointing."""


class _LauncherStdio:
    """This process's stdout and stderr, sent along to a forked rank. A forkserver's children
    would otherwise write to the forkserver's, fixed when it started (a log or a test's capture
    file of an earlier launch)."""

    def __reduce__(self):  # at pickling, inside Process.start: the fds travel with the job
        return (_LauncherStdio._received, (reduction.DupFd(1), reduction.DupFd(2)))

    @staticmethod
    def _received(out: Any, err: Any) -> tuple[int, int]:
        return out.detach(), err.detach()


def _rank_entry(
    local_rank: int,
    fn: Callable[..., Any],
    nprocs: int,
    store_port: int,
    args: tuple,
    environ: dict[str, str] | None = None,
    stdio: tuple[int, int] | None = None,
) -> None:
    if stdio is not None:
        for target, fd in zip((1, 2), stdio, strict=True):
            os.dup2(fd, target)
            os.close(fd)
    if environ is not None:  # the launcher's, not the forkserver's (fixed when it started)
        os.environ.clear()
        os.environ.update(environ)
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        **{STORE_PORT_ENV: str(store_port)},
    )
    if not cpu_compat.cuda_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    fn(*args)


def run_on_ranks(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    handles_stop: bool = False,
    own_process: bool = False,
) -> None:
    """Call `fn(*args)` on `nprocs` ranks; they find each other through env:// on localhost.

    `fn` must be importable (module level): it travels to the ranks by pickle.
    SIGTERM / SIGUSR1 received meanwhile are passed on to the ranks. A function that
    `handles_stop` (the trainer: it saves and records its outcome) may end either way once
    signalled; for any other, a signal means `Stopped` (rerun the command to redo the stage).
    A world of one runs in this process unless `own_process` (a worker that sets up process
    groups of its own).
    """
    if nprocs == 1 and not own_process and "WORLD_SIZE" not in os.environ:
        fn(*args)
        return
    launcher = os.environ.get("MINITRON_LAUNCHER")
    if launcher:
        received = run_with_torchrun(fn, nprocs, args, launcher)
    else:
        method = os.environ.get("MINITRON_START_METHOD") or cpu_compat.rank_start_method()
        if method not in ("spawn", "forkserver"):
            raise MinitronError(
                f"MINITRON_START_METHOD={method!r}: expected 'spawn' or 'forkserver'"
            )
        forked = method == "forkserver"
        if forked:
            mp.get_context("forkserver").set_forkserver_preload(RANK_PRELOAD)
        # The ranks meet at a key-value store served by this process on a port the OS picked
        # and still holds (as torchrun's agent does): no port is chosen, released and bound
        # again later, which another process (a concurrent launch, gloo's own connections)
        # could take in between ("EADDRINUSE" when the first rank starts its store).
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # what this process wrote comes before what the ranks write
        environ, stdio = (dict(os.environ), _LauncherStdio()) if forked else (None, None)
        context = mp.start_processes(
            _rank_entry,
            args=(fn, nprocs, store.port, args, environ, stdio),
            nprocs=nprocs,
            start_method=method,
            join=False,
        )
        with forward_signals([p.pid for p in context.processes]) as received:
            try:
                while not context.join():
                    pass
            except mp.ProcessExitedException:
                if not received:
                    raise
        del store
    if received and not handles_stop:
        raise Stopped("stopped by a signal; rerun the same command to resume")


def run_with_torchrun(fn: Callable[..., Any], nprocs: int, args: tuple, launcher: str) -> list[int]:
    """Start `nprocs` ranks with torchrun (behind `launcher` unless it is just "torchrun");
    returns the stop signals that were passed on. torchrun forwards SIGUSR1 too, and waits
    MINITRON_SHUTDOWN_TIMEOUT seconds (default 1800) for signalled ranks to save and exit
    before it kills them."""
    per_node = int(os.environ.get("MINITRON_PROCS_PER_NODE", nprocs))
    nnodes = -(-nprocs // per_node)
    if nprocs % nnodes:
        raise MinitronError(
            f"{nprocs} ranks cannot be spread evenly over {nnodes} nodes of {per_node} processes"
        )
    # One node: port 0, torchrun's agent binds a port the OS picks (no race with other
    # processes); several nodes need MINITRON_RDZV_ENDPOINT (a free port here only serves
    # nodes simulated on this machine).
    default = "127.0.0.1:0" if nnodes == 1 else f"127.0.0.1:{free_port()}"
    endpoint = os.environ.get("MINITRON_RDZV_ENDPOINT") or default
    job_dir = Path(os.environ.get("MINITRON_JOB_DIR", "."))
    job_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=job_dir, prefix=".minitron-job-", suffix=".pkl", delete=False
    ) as fh:
        pickle.dump((fn, args), fh)
        job = fh.name
    prefix = [] if launcher.strip() == "torchrun" else shlex.split(launcher.format(nodes=nnodes))
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nprocs // nnodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={uuid.uuid4().hex[:12]}",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"--shutdown-timeout={os.environ.get('MINITRON_SHUTDOWN_TIMEOUT', '1800')}",
        "-m",
        "minitron_nemo.runtime.rank_main",
        job,
    ]
    try:
        proc = subprocess.Popen(cmd)
        with forward_signals([proc.pid]) as received:  # torchrun passes them on to its workers
            returncode = proc.wait()
    finally:
        os.unlink(job)
    if returncode != 0 and not received:
        raise MinitronError(f"ranks failed (exit code {returncode}); command: {shlex.join(cmd)}")
    return received
