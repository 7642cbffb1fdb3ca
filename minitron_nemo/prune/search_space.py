"""Every architecture within a parameter budget (P1 section 3, step 2), no megatron.

The grid: each searched axis goes down from the source's size in hardware-friendly steps
(hidden / ffn in multiples of `*_step`, attention in whole heads per query group, depth in
`num_layers_step` layers) as far as the reduction limits allow; axes not searched keep the
source's size. A candidate is kept when it passes every rule a prune target must pass
(`plan.target_arch`: divisibility, TP / PP, exportable to transformers) and its parameter count
(total or non-embedding) lies in [budget x (1 - tolerance), budget].
"""

from __future__ import annotations

import itertools
import math

from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.prune.plan import Sizes, Targets, search_architecture, target_arch


def _down(value: int, step: int, max_reduction: float) -> list[int]:
    """value, value - step, ... (multiples of step below value) down to value x (1 - limit)."""
    floor = math.ceil(value * (1 - max_reduction))
    values = [value]
    v = (value - 1) // step * step
    while v >= max(floor, step):
        values.append(v)
        v -= step
    return values


def axis_values(source: ModelArch, search) -> dict[str, list[int]]:
    """The values each searched axis may take (largest first)."""
    grids: dict[str, list[int]] = {}
    for axis in search.axes:
        if axis == "hidden_size":
            grids[axis] = _down(source.hidden_size, search.hidden_size_step,
                                search.max_width_reduction)  # fmt: skip
        elif axis == "ffn_hidden_size":
            grids[axis] = _down(source.ffn_hidden_size, search.ffn_hidden_size_step,
                                search.max_width_reduction)  # fmt: skip
        elif axis == "num_attention_heads":  # whole heads per query group, all groups kept
            groups = source.num_query_groups
            per_group = source.num_attention_heads // groups
            grids[axis] = [p * groups for p in _down(per_group, 1, search.max_width_reduction)]
        elif axis == "num_layers":
            grids[axis] = _down(source.num_layers, search.num_layers_step,
                                search.max_depth_reduction)  # fmt: skip
        else:
            raise MinitronError(f"prune.search.axes: {axis!r} cannot be searched")
    return grids


def count_params(arch: ModelArch, count: str) -> int:
    return arch.num_parameters(include_embeddings=count == "total")


def enumerate_candidates(source: ModelArch, search, tp: int = 1, pp: int = 1) -> list[ModelArch]:
    """Every valid architecture in the budget, largest (in counted parameters) first."""
    grids = axis_values(source, search)
    low = search.target_params * (1 - search.tolerance)
    found = []
    for combo in itertools.product(*grids.values()):
        sizes = dict(zip(grids, combo, strict=True))
        try:
            arch = target_arch(source, Sizes(**sizes), tp, pp)
        except MinitronError:
            continue
        if low <= count_params(arch, search.count) <= search.target_params:
            found.append(arch)
    if not found:
        raise MinitronError(
            f"prune.search: no architecture along {list(search.axes)} has {search.count} "
            f"parameters in [{low:,.0f}, {search.target_params:,}] (source: "
            f"{count_params(source, search.count):,}); widen the tolerance or the limits"
        )
    if len(found) > search.max_candidates:
        raise MinitronError(
            f"prune.search: {len(found)} candidates exceed max_candidates = "
            f"{search.max_candidates}; coarsen the steps or narrow the tolerance"
        )
    found.sort(key=lambda a: (-count_params(a, search.count), -a.num_layers, -a.hidden_size))
    return found


def describe(arch: ModelArch, source: ModelArch) -> str:
    """Short name of a candidate: the axes that differ from the source."""
    parts = []
    for axis, short in (("num_layers", "L"), ("hidden_size", "h"), ("ffn_hidden_size", "ffn"),
                        ("num_attention_heads", "heads")):  # fmt: skip
        if getattr(arch, axis) != getattr(source, axis):
            parts.append(f"{short}{getattr(arch, axis)}")
    return "-".join(parts) or "source"


def plan_architecture(source: ModelArch, cfg: Targets, tp: int, pp: int) -> tuple[ModelArch, dict]:
    """The target architecture (validated before any work) and how it was chosen; with
    `prune.search`, the largest candidate (the search itself picks among all of them)."""
    search = getattr(cfg, "search", None)
    if search is not None and source.is_moe:
        raise MinitronError(f"prune.search: not available for MoE models ({source.family}) yet")
    if search is not None:
        candidates = enumerate_candidates(source, search, tp, pp)
        return candidates[0], {"search_candidates": len(candidates)}
    if cfg.target_params is not None:
        arch, search = search_architecture(source, cfg, tp, pp)
        return arch, {"search": search}
    return target_arch(source, cfg, tp, pp), {}
