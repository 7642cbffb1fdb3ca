"""Training checkpoints: save (synchronous, or megatron's asynchronous dist-checkpoint save),
load, retention, disk space.

A checkpoint is `ROOT/step_N/`: weights/ (megatron dist-checkpoint of model + optimizer, loads at
any TP/PP), rng/rankR.pt, train_state.json (step, consumed samples, scheduler, alpha), arch.yaml,
meta.yaml, tokenizer/ and DONE. It is written under `.step_N.incomplete` and renamed by rank 0
only after every rank's shards are on disk (for an async save: when megatron reports the
background write finished on all ranks), so a checkpoint killed mid-save is never picked up.
After each completed save only the newest `keep_last` checkpoints (plus every `keep_every`-th
step, if set) are kept; the newest complete one is never removed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_nemo import atomic, checkpoint
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.runtime.diskspace import require_free, translate_disk_full

STEP_DIR = re.compile(r"step_(\d+)")


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under `root`, ascending."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.fullmatch(p.name)) and atomic.is_complete(p)
    ]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The complete step_N directory with the highest N (incomplete ones are ignored)."""
    steps = complete_steps(root)
    return steps[-1][1] if steps else None


def kept_steps(steps: list[int], keep_last: int, keep_every: int | None) -> set[int]:
    """Which of `steps` retention keeps: the newest `keep_last`, and multiples of keep_every."""
    kept = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        kept |= {s for s in steps if s % keep_every == 0}
    if steps:
        kept.add(max(steps))
    return kept


def checkpoint_bytes(arch: ModelArch, dtype: torch.dtype, extra_params: int = 0) -> int:
    """About how many bytes one checkpoint takes: weights + Adam moments (+ fp32 main weights
    when training in bf16)."""
    params = arch.num_parameters() + extra_params
    per_param = torch.finfo(dtype).bits // 8 + 8 + (4 if dtype != torch.float32 else 0)
    return params * per_param


class CheckpointManager:
    """Saves and loads one training's checkpoints (all methods are collective over the ranks)."""

    def __init__(
        self,
        root: Path,
        arch: ModelArch,
        dtype: torch.dtype,
        tokenizer_dir: Path | None,
        keep_last: int = 2,
        keep_every: int | None = None,
        async_save: bool = False,
        extra_params: int = 0,
    ) -> None:
        self.root = root
        self.arch = arch
        self.dtype = dtype
        self.tokenizer_dir = tokenizer_dir
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.needed = checkpoint_bytes(arch, dtype, extra_params)
        self.queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()

    # -- saving ------------------------------------------------------------------------
    def save(
        self,
        step: int,
        sharded_state: dict,
        state: dict,
        scheduler_state: dict,
        during_save: Callable[[int], None] | None = None,
    ) -> None:
        """Write step `step`; with async save the rename happens in a later `poll()`."""
        from megatron.core import dist_checkpointing

        self.wait()  # one save in flight at a time
        step_dir = self.root / f"step_{step:06d}"
        tmp = atomic.incomplete_path(step_dir)
        rank = dist.get_rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            require_free(self.root, self.needed)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "weights").mkdir(parents=True)
            (tmp / "rng").mkdir()
        dist.barrier()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / "rng" / f"rank{rank}.pt")
        record = {**state, "scheduler": scheduler_state}
        with translate_disk_full(self.root, self.needed):
            request = dist_checkpointing.save(
                sharded_state, str(tmp / "weights"), async_sharded_save=self.queue is not None
            )

        def finalize() -> None:
            if during_save is not None:
                during_save(step)  # test hook: die with a half-written checkpoint
            dist.barrier()
            if dist.get_rank() == 0:
                self._finalize(tmp, step_dir, record)
            dist.barrier()

        if request is None:
            finalize()
        else:
            request.add_finalize_fn(finalize)
            self.queue.schedule_async_request(request)

    def _finalize(self, tmp: Path, step_dir: Path, record: dict) -> None:
        """Rank 0, after every rank's shards are written: metadata, DONE, rename, retention."""
        with translate_disk_full(self.root, self.needed):
            checkpoint.write_meta(tmp, self.arch, self.dtype, kind="train", step=record["step"])
            (tmp / "train_state.json").write_text(json.dumps(record))
            if self.tokenizer_dir is not None and self.tokenizer_dir.is_dir():
                checkpoint.copy_tokenizer(self.tokenizer_dir, tmp / "tokenizer")
            (tmp / atomic.DONE).write_text("ok\n")
        shutil.rmtree(step_dir, ignore_errors=True)
        tmp.rename(step_dir)
        self._retain()

    def _retain(self) -> None:
        steps = complete_steps(self.root)
        kept = kept_steps([s for s, _ in steps], self.keep_last, self.keep_every)
        for step, path in steps:
            if step not in kept:
                shutil.rmtree(path, ignore_errors=True)

    def poll(self) -> None:
        """Finalize async saves that have finished (non-blocking; collective)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Finalize every pending async save (blocking; collective)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        self.wait()
        if self.queue is not None:
            self.queue.close()

    def clean_incomplete(self) -> None:
        """Rank 0: remove half-written checkpoints left by a killed run (never picked up)."""
        if dist.get_rank() == 0 and self.root.is_dir():
            for path in self.root.glob(".step_*.incomplete"):
                shutil.rmtree(path, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------
    @staticmethod
    def load(step_dir: Path, sharded_state: dict, load_into: Callable[[dict], None]) -> dict:
        """Load weights + optimizer (at any TP/PP) and this rank's RNG; returns train_state."""
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(sharded_state, str(step_dir / "weights"))
        load_into(loaded)
        rng_file = step_dir / "rng" / f"rank{dist.get_rank()}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return json.loads((step_dir / "train_state.json").read_text())


def async_save_available() -> bool:
    """megatron's async dist-checkpoint save: a GPU and nvidia-resiliency-ext (NGC images)."""
    import importlib.util

    import torch

    return (
        torch.cuda.is_available() and importlib.util.find_spec("nvidia_resiliency_ext") is not None
    )
