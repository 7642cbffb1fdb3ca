"""Outputs that never look complete unless they are: a directory is built under a hidden
`.NAME.incomplete` sibling and renamed into place with a `DONE` marker written last.
(Pure Python: used by light modules too.)"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from minitron_nemo.errors import MinitronError

DONE = "DONE"


def is_complete(path: Path) -> bool:
    return (path / DONE).is_file()


def incomplete_path(out: Path) -> Path:
    return out.parent / f".{out.name}.incomplete"


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` (with DONE) only if the block succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise MinitronError(f"{out}: already exists (remove it or pass --force to replace it)")
    tmp = incomplete_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def write_json(path: Path, data: dict) -> None:
    """Write `data` as JSON under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    """The JSON at `path`, or None when there is none."""
    return json.loads(path.read_text()) if path.is_file() else None
