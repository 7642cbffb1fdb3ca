"""Parsing of the recipe's data fields (pure Python: config validation imports it)."""

from __future__ import annotations

import re
from typing import Any

from minitron_nemo.errors import MinitronError

_NUMBER = re.compile(r"\d+(\.\d*)?|\.\d+")


def parse_split(text: str, field: str = "data.split") -> list[float]:
    """'99,0.5,0.5' -> [99, 0.5, 0.5] (train, valid, test); strict, unlike megatron's parser
    (which silently reads "abc" as 0,0,0)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not 1 <= len(parts) <= 3 or not all(_NUMBER.fullmatch(p) for p in parts):
        raise MinitronError(
            f'{field}: expected up to three non-negative numbers "train,valid,test" such as '
            f'"99,0.5,0.5", got {text!r}'
        )
    weights = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    if sum(weights) <= 0:
        raise MinitronError(f"{field}: the weights of {text!r} add up to 0")
    return weights


def parse_blend(blend: list[Any], field: str = "data.blend") -> list[tuple[float, str]]:
    """[[0.7, PATH], [0.3, PATH]] -> [(0.7, PATH), (0.3, PATH)]; weights must be positive
    numbers, paths non-empty strings."""
    if not isinstance(blend, list | tuple) or not blend:
        raise MinitronError(f"{field}: expected a non-empty list of [weight, path] pairs")
    out = []
    for i, entry in enumerate(blend):
        where = f"{field}[{i}]"
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise MinitronError(f"{where}: expected [weight, path], got {entry!r}")
        weight, path = entry
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise MinitronError(f"{where}: the weight must be a positive number, got {weight!r}")
        if not isinstance(path, str) or not path:
            raise MinitronError(f"{where}: the path must be a non-empty string, got {path!r}")
        out.append((float(weight), path))
    return out
