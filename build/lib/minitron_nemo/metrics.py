"""Training metrics files (metrics.jsonl: one JSON object per logged step). No torch."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(out: Path) -> list[dict]:
    """The logged steps of a training output directory (empty if none)."""
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
