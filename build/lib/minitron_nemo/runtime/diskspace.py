"""Saving into a full filesystem: refuse before writing when the space is known to be short, and
turn the failure into one line when it runs out during a write.

A save that fails this way leaves its output under its temporary (`.incomplete`) name, which is
never picked up; earlier checkpoints are not touched. megatron's dist-checkpoint writer does not
always surface ENOSPC as such (seen: "Worker failure ... unexpected pos 704 vs 598"), so any
exception during a save is reported as disk-full when the filesystem has less free space left
than the save needed.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from minitron_nemo.errors import MinitronError

MARGIN = 1.05


def model_bytes(arch, dtype) -> int:
    """Bytes of `arch`'s weights in `dtype` (a torch dtype)."""
    import torch

    return arch.num_parameters() * (torch.finfo(dtype).bits // 8)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (its first existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def disk_full_error(path: Path, needed: int) -> MinitronError:
    return MinitronError(
        f"{path}: not enough disk space ({_gb(free_bytes(path))} free, about {_gb(needed)} "
        "needed); earlier outputs are intact: free space or point the output elsewhere"
    )


def require_free(path: Path, needed: int) -> None:
    """Refuse to start a save of about `needed` bytes into `path` if it cannot fit."""
    if needed * MARGIN > free_bytes(path):
        raise disk_full_error(path, needed)


@contextlib.contextmanager
def translate_disk_full(path: Path, needed: int) -> Iterator[None]:
    """Re-raise a failure during a save as the one-line disk-full error when the filesystem is
    (nearly) full or the error is ENOSPC."""
    try:
        yield
    except MinitronError:
        raise
    except Exception as exc:
        nospace = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if nospace or free_bytes(path) < max(needed * (MARGIN - 1), 1 << 20):
            raise disk_full_error(path, needed) from exc
        raise
