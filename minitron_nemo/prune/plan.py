"""The pruned architecture from the recipe's targets (pure Python: `minitron validate` and
config loading use it without importing torch)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.families import family_by_name

WIDTH_AXES = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
SEARCH_AXES = (*WIDTH_AXES, "num_layers")


DEPTH_METHODS = ("block", "per_layer", "block_importance")


class Targets(Protocol):
    """What the pruned model should look like (config.PruneConfig has these fields); unset
    (None) sizes keep the source's size."""

    hidden_size: int | None
    ffn_hidden_size: int | None
    num_attention_heads: int | None
    num_query_groups: int | None
    num_layers: int | None
    drop_layers: list[int] | None
    target_params: int | None
    search_axes: list[str]
    num_moe_experts: int | None
    moe_ffn_hidden_size: int | None
    moe_shared_expert_intermediate_size: int | None


@dataclass
class Sizes:
    """Fixed target sizes (a `Targets` without a budget); None keeps the source's size."""

    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    num_layers: int | None = None
    drop_layers: list[int] | None = None
    target_params: int | None = None
    search_axes: list[str] = field(default_factory=list)
    num_moe_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None


def target_arch(source: ModelArch, targets: Targets, tp: int = 1, pp: int = 1) -> ModelArch:
    """The pruned architecture; refuses impossible targets with one line before any work."""
    if (
        source.is_moe
        and targets.ffn_hidden_size is not None
        and 0 not in source.moe_layer_pattern()
    ):
        raise MinitronError(
            f"prune.ffn_hidden_size: this {source.family} model has no dense MLP layers (every "
            "layer is MoE); prune moe_ffn_hidden_size (expert width) instead"
        )
    sizes = {
        axis: getattr(targets, axis)
        if getattr(targets, axis) is not None
        else getattr(source, axis)
        for axis in (*WIDTH_AXES, "num_layers")
    }
    if targets.drop_layers is not None:
        bad = [i for i in targets.drop_layers if not 0 <= i < source.num_layers]
        if bad or len(set(targets.drop_layers)) != len(targets.drop_layers):
            raise MinitronError(
                f"prune.drop_layers: expected distinct indices in 0..{source.num_layers - 1}, "
                f"got {targets.drop_layers}"
            )
        n_left = source.num_layers - len(targets.drop_layers)
        if targets.num_layers is not None and targets.num_layers != n_left:
            raise MinitronError(
                f"prune.num_layers = {targets.num_layers} contradicts prune.drop_layers "
                f"({n_left} layers left)"
            )
        sizes["num_layers"] = n_left
    for axis, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise MinitronError(f"prune.{axis}: expected a positive integer, got {value!r}")
        if value > getattr(source, axis):
            raise MinitronError(
                f"prune.{axis} = {value} is larger than the source's {getattr(source, axis)}"
            )
    if sizes["num_attention_heads"] % sizes["num_query_groups"]:
        raise MinitronError(
            f"prune.num_attention_heads = {sizes['num_attention_heads']} is not a multiple of "
            f"num_query_groups = {sizes['num_query_groups']}"
        )
    per_group = sizes["num_attention_heads"] // sizes["num_query_groups"]
    if per_group > source.num_attention_heads // source.num_query_groups:
        raise MinitronError(
            f"prune: {per_group} heads per query group exceeds the source's "
            f"{source.num_attention_heads // source.num_query_groups}"
        )
    arch = source.replace(
        hidden_size=sizes["hidden_size"],
        ffn_hidden_size=sizes["ffn_hidden_size"],
        num_attention_heads=sizes["num_attention_heads"],
        num_query_groups=sizes["num_query_groups"],
        num_layers=sizes["num_layers"],
        # Which kept layers are MoE is known once the layers are chosen (prune/select.py);
        # until then the first num_layers layers' kinds stand in.
        moe_layers=[i for i in source.moe_layers if i < sizes["num_layers"]]
        if source.moe_layers is not None
        else None,
    )
    arch = arch.replace(**_moe_sizes(source, targets))
    try:
        arch.check_parallel(tp, pp)
        family_by_name(arch.family).check_exportable(arch)
    except MinitronError as exc:
        raise MinitronError(f"prune target: {exc}") from None
    return arch


# prune target -> ModelArch field of the MoE axes
MOE_AXES = {
    "num_moe_experts": "num_experts",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_size",
}


def _moe_sizes(source: ModelArch, targets: Targets) -> dict[str, int]:
    """The pruned model's expert count / width / shared-expert width (checked)."""
    out = {}
    for axis, name in MOE_AXES.items():
        value = getattr(targets, axis, None)
        if value is None:
            continue
        if not source.is_moe or (
            name == "moe_shared_expert_size" and not source.moe_shared_expert_size
        ):
            what = "an MoE model" if name != "moe_shared_expert_size" else "a shared expert"
            raise MinitronError(f"prune.{axis}: needs {what} ({source.family} has none)")
        if not isinstance(value, int) or value <= 0:
            raise MinitronError(f"prune.{axis}: expected a positive integer, got {value!r}")
        if value > getattr(source, name):
            raise MinitronError(
                f"prune.{axis} = {value} is larger than the source's {getattr(source, name)}"
            )
        out[name] = value
    experts = out.get("num_experts", source.num_experts)
    if source.is_moe and experts < source.moe_router_topk:
        raise MinitronError(
            f"prune.num_moe_experts = {experts} is smaller than the router's top-k "
            f"({source.moe_router_topk}): every token must still find its k experts"
        )
    return out


def _axis_candidates(source: ModelArch, axis: str, tp: int) -> list[int]:
    value = getattr(source, axis)
    if axis == "num_layers":
        return list(range(max(1, value // 2), value + 1))
    if axis in ("num_attention_heads", "num_query_groups"):
        return [v for v in range(tp, value + 1, tp)]
    step = max(tp, 64 if value >= 1024 else 16)
    return [v for v in range(step, value + 1, step) if v >= value // 4] + (
        [value] if value % step else []
    )


def search_architecture(
    source: ModelArch, targets: Targets, tp: int = 1, pp: int = 1
) -> tuple[ModelArch, dict]:
    """Largest architecture (in parameters) within `target_params` along the allowed axes.

    Ties prefer keeping depth (P2: width pruning beats depth pruning), then hidden size.
    """
    budget = targets.target_params
    assert budget is not None
    bad = [a for a in targets.search_axes if a not in SEARCH_AXES]
    if bad or not targets.search_axes:
        raise MinitronError(
            f"prune.search_axes: expected a subset of {SEARCH_AXES}, got {targets.search_axes}"
        )
    grids = {a: _axis_candidates(source, a, tp) for a in targets.search_axes}
    best: tuple | None = None
    considered = 0
    for combo in itertools.product(*grids.values()):
        change = dict(zip(grids, combo, strict=True))
        heads = change.get("num_attention_heads", source.num_attention_heads)
        groups = change.get("num_query_groups", source.num_query_groups)
        if (
            heads % groups
            or heads // groups > source.num_attention_heads // source.num_query_groups
        ):
            continue
        arch = source.replace(**change)
        if arch.num_layers % pp or arch.hidden_size % arch.num_attention_heads:
            continue
        considered += 1
        params = arch.num_parameters()
        if params > budget:
            continue
        key = (params, arch.num_layers, arch.hidden_size)
        if best is None or key > best[0]:
            best = (key, arch)
    if best is None:
        raise MinitronError(
            f"prune.target_params = {budget:,} is below every architecture along "
            f"{targets.search_axes}"
        )
    arch = best[1]
    return arch, {
        "budget": budget,
        "chosen_params": arch.num_parameters(),
        "candidates": considered,
    }
