"""Preemption: SIGTERM / SIGUSR1 (Slurm's time limit or preemption notice) -> finish the current
step, save, exit 0.

Every rank records the signal in a flag; once per step the ranks agree (all-reduce MAX) so they
all stop after the same step, even if only some of them were signalled. The process that starts
the ranks forwards the signals to them (`forward_signals`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by SIGTERM / SIGUSR1 (installed for the lifetime of the `with` block)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame) -> None:
        self.received = signum

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextlib.contextmanager
def forward_signals(pids: list[int]) -> Iterator[list[int]]:
    """While ranks run as child processes, pass SIGTERM / SIGUSR1 on to them instead of dying;
    yields the list of signals received."""
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
