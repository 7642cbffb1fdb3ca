"""Every architecture within a parameter budget (P1 section 3, step 2), no megatron.

The grid: each searched axis goes down from the source's size in hardware-friendly steps
(hidden / ffn in multiples of `*_step`, attention in whole heads per query group, depth in
`num_layers_step` layers) as far as the reduction limits allow; axes not searched keep the
source's size. A candidate is kept when it passes every rule a prune target must pass
(`plan.target_arch`: divisibility, TP / PP, exportable to transformers), stays within every
budget the recipe sets (parameters, total or non-embedding; active parameters per token; memory
of weights + KV cache) and uses at least (1 - tolerance) of one of them.
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


MOE_GRID_AXES = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")


def searched_axes(source: ModelArch, search) -> list[str]:
    """`search.axes`, or every axis this model has; an axis it lacks is refused."""
    has_dense_mlp = not source.is_moe or 0 in source.moe_layer_pattern()
    available = ["hidden_size", *(["ffn_hidden_size"] if has_dense_mlp else []),
                 "num_attention_heads", "num_layers"]  # fmt: skip
    if source.is_moe:
        available += ["num_moe_experts", "moe_ffn_hidden_size"]
        if source.moe_shared_expert_size:
            available.append("moe_shared_expert_intermediate_size")
    if search.axes is None:
        return available
    missing = [a for a in search.axes if a not in available]
    if missing:
        raise MinitronError(
            f"prune.search.axes: this {source.family} model has no {missing[0]} to search; "
            f"it has {available}"
        )
    return list(search.axes)


def axis_values(source: ModelArch, search) -> dict[str, list[int]]:
    """The values each searched axis may take (largest first)."""
    grids: dict[str, list[int]] = {}
    width = search.max_width_reduction
    for axis in searched_axes(source, search):
        if axis == "hidden_size":
            grids[axis] = _down(source.hidden_size, search.hidden_size_step, width)
        elif axis == "ffn_hidden_size":
            grids[axis] = _down(source.ffn_hidden_size, search.ffn_hidden_size_step, width)
        elif axis == "num_attention_heads":  # whole heads per query group, all groups kept
            groups = source.num_query_groups
            per_group = source.num_attention_heads // groups
            grids[axis] = [p * groups for p in _down(per_group, 1, width)]
        elif axis == "num_layers":
            grids[axis] = _down(source.num_layers, search.num_layers_step,
                                search.max_depth_reduction)  # fmt: skip
        elif axis == "num_moe_experts":
            values = _down(source.num_experts, search.num_moe_experts_step,
                           search.max_expert_reduction)  # fmt: skip
            grids[axis] = [v for v in values if v >= source.moe_router_topk]
        elif axis == "moe_ffn_hidden_size":
            grids[axis] = _down(source.moe_ffn_hidden_size, search.moe_ffn_hidden_size_step, width)
        else:  # moe_shared_expert_intermediate_size
            grids[axis] = _down(source.moe_shared_expert_size, search.moe_ffn_hidden_size_step,
                                width)  # fmt: skip
    return grids


MIB = 2**20


def measures(arch: ModelArch, search) -> dict[str, float]:
    """What each budget of `search` counts, for `arch` (memory in MiB)."""
    out: dict[str, float] = {}
    if search.target_params is not None:
        out["target_params"] = count_params(arch, search.count)
    if search.target_active_params is not None:
        out["target_active_params"] = arch.num_parameters(active=True)
    if search.target_memory_mb is not None:
        memory = arch.memory_bytes(search.memory_seq_length, search.memory_batch_size)
        out["target_memory_mb"] = memory / MIB
    return out


def budget_use(arch: ModelArch, search) -> float:
    """The largest fraction of a budget the candidate uses (> 1: over a budget)."""
    return max(value / getattr(search, name) for name, value in measures(arch, search).items())


def within_budgets(arch: ModelArch, search) -> bool:
    """Within every budget, and using at least (1 - tolerance) of one of them."""
    used = [value / getattr(search, name) for name, value in measures(arch, search).items()]
    return max(used) <= 1 and max(used) >= 1 - search.tolerance


def count_params(arch: ModelArch, count: str) -> int:
    return arch.num_parameters(include_embeddings=count == "total")


def _budgets_text(source: ModelArch, search) -> str:
    parts = []
    for name, value in measures(source, search).items():
        unit = " MiB" if name == "target_memory_mb" else ""
        parts.append(f"{name} = {getattr(search, name):,}{unit} (source: {value:,.0f}{unit})")
    return ", ".join(parts)


def enumerate_candidates(source: ModelArch, search, tp: int = 1, pp: int = 1) -> list[ModelArch]:
    """Every valid architecture in the budgets, largest (share of its tightest budget) first."""
    grids = axis_values(source, search)
    found = []
    for combo in itertools.product(*grids.values()):
        sizes = dict(zip(grids, combo, strict=True))
        try:
            arch = target_arch(source, Sizes(**sizes), tp, pp)
        except MinitronError:
            continue
        if within_budgets(arch, search):
            found.append(arch)
    if not found:
        raise MinitronError(
            f"prune.search: no architecture along {list(grids)} is within "
            f"{_budgets_text(source, search)} and uses at least {1 - search.tolerance:.0%} of "
            "one of them; widen the tolerance or the limits"
        )
    if len(found) > search.max_candidates:
        raise MinitronError(
            f"prune.search: {len(found)} candidates exceed max_candidates = "
            f"{search.max_candidates}; coarsen the steps or narrow the tolerance"
        )
    found.sort(key=lambda a: (-budget_use(a, search), -a.num_layers, -a.hidden_size))
    return found


SHORT_NAMES = (("num_layers", "L"), ("hidden_size", "h"), ("ffn_hidden_size", "ffn"),
               ("num_attention_heads", "heads"), ("num_experts", "E"),
               ("moe_ffn_hidden_size", "eff"), ("moe_shared_expert_size", "sh"))  # fmt: skip


def describe(arch: ModelArch, source: ModelArch) -> str:
    """Short name of a candidate: the axes that differ from the source."""
    parts = []
    for axis, short in SHORT_NAMES:
        if getattr(arch, axis) != getattr(source, axis):
            parts.append(f"{short}{getattr(arch, axis)}")
    return "-".join(parts) or "source"


def plan_architecture(source: ModelArch, cfg: Targets, tp: int, pp: int) -> tuple[ModelArch, dict]:
    """The target architecture (validated before any work) and how it was chosen; with
    `prune.search`, the largest candidate (the search itself picks among all of them)."""
    search = getattr(cfg, "search", None)
    if search is not None:
        candidates = enumerate_candidates(source, search, tp, pp)
        return candidates[0], {"search_candidates": len(candidates)}
    if cfg.target_params is not None:
        arch, search = search_architecture(source, cfg, tp, pp)
        return arch, {"search": search}
    return target_arch(source, cfg, tp, pp), {}
