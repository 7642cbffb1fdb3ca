"""The prune stage: importance (calibrate or reuse) -> choose architecture -> slice -> re-shard.

Output directory::

    importance.pt        scores of the source (reusable by a second prune with other targets)
    ckpt/                the pruned model as a megatron checkpoint at the run's TP/PP, sliced
                         on the shards (prune/shard_slice.py)
    hf/                  the same as an HF directory (streamed export; prune.hf_output)
    prune_report.json    choices, parameter counts, depth scores, timings
    plots/*.png          importance heat maps, depth scores, parameter counts (prune.plots)
    DONE
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minitron_nemo import atomic, checkpoint
from minitron_nemo.config import DistillConfig, PruneConfig
from minitron_nemo.convert.mcore_to_hf import mcore_to_hf
from minitron_nemo.data.datasets import DataSpec, build_indices, calibration_indices
from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.prune import depth
from minitron_nemo.prune.importance import collect_importance, rank_steps
from minitron_nemo.prune.search_space import enumerate_candidates, plan_architecture
from minitron_nemo.prune.select import PrunePlan, select
from minitron_nemo.prune.shard_slice import write_pruned_checkpoint
from minitron_nemo.report import plots
from minitron_nemo.runtime.forward import lm_loss
from minitron_nemo.runtime.launch import run_on_ranks

log = logging.getLogger(__name__)


def _calibrate_on_rank(
    ckpt: Path,
    data: DataSpec,
    width_indices: list[int],
    depth_indices: list[int],
    cfg: PruneConfig,
    tp: int,
    pp: int,
    want_width: bool,
    block_sizes: list[int],
    want_skip: bool,
    previous: dict | None,
    out_path: Path,
    ep: int = 1,
) -> None:
    from megatron.core import parallel_state

    from minitron_nemo.data.datasets import calibration_reader
    from minitron_nemo.runtime import distributed

    with distributed.initialize(tp=tp, pp=pp, ep=ep) as ctx:
        model, arch = checkpoint.load_model(ckpt, use_te=False)
        reader = calibration_reader(data)
        if want_width:
            start = time.time()
            # with expert parallelism (ep data-parallel ranks) each rank reads its share of
            # every calibration step; the depth scores below run the same samples on every rank
            steps = rank_steps(width_indices, cfg.micro_batch_size,
                               parallel_state.get_data_parallel_world_size(),
                               parallel_state.get_data_parallel_rank())  # fmt: skip
            imp = collect_importance(
                model,
                (reader.read(share) for share, _ in steps),
                len(width_indices),
                data.seq_length,
                arch.num_layers,
                seq=cfg.aggregation_seq,
                batch=cfg.aggregation_batch,
                head_score=cfg.head_score,
                expert_taylor=arch.is_moe and cfg.expert_score == "taylor",
                vocab_size=arch.vocab_size,
                loss_scales=[fraction for _, fraction in steps],
            )
            imp_state = imp.to_state()
            imp_state["calibration_seconds"] = time.time() - start
        else:
            imp_state = dict(previous or {})
        mbs = cfg.micro_batch_size
        depth_samples = reader.read(depth_indices)  # a few samples, scored many times
        if want_skip or block_sizes:
            imp_state["base_loss"] = lm_loss(model, depth_samples, arch.vocab_size, mbs)
        if want_skip:
            imp_state["layer_skip_loss"] = torch.tensor(
                depth.layer_skip_losses(model, depth_samples, arch.num_layers, arch.vocab_size, mbs)
            )
        blocks = dict(imp_state.get("block_loss") or {})
        for k in block_sizes:
            blocks[k] = depth.block_losses(
                model, depth_samples, arch.num_layers, k, arch.vocab_size, mbs
            )
        imp_state["block_loss"] = blocks or None
        if ctx.rank == 0:
            torch.save(imp_state, out_path)


def _load_importance(path: Path, head_score: str | None = None) -> dict:
    """An importance file; with `head_score`, its `heads` are that score (refused if the file
    was computed without it)."""
    state = torch.load(path, weights_only=False)
    if not isinstance(state, dict) or "heads" not in state:
        raise MinitronError(f"{path}: not an importance file written by `minitron prune`")
    if head_score is not None:
        heads = state.get(f"heads_{head_score}")
        if heads is None and state.get("head_score", "activation") == head_score:
            heads = state["heads"]
        if heads is None:
            raise MinitronError(
                f"{path}: has no {head_score} head scores (computed with head_score "
                f"{state.get('head_score', 'activation')}); recalibrate or set prune.head_score"
            )
        state = {**state, "heads": heads, "head_score": head_score}
    return state


def choose_layers(source: ModelArch, arch: ModelArch, cfg: PruneConfig, imp: dict) -> list[int]:
    """Kept layers (ascending) for the target depth."""
    if cfg.drop_layers is not None:
        return [i for i in range(source.num_layers) if i not in set(cfg.drop_layers)]
    k = source.num_layers - arch.num_layers
    if k == 0:
        return list(range(source.num_layers))
    if cfg.depth_method == "block":
        dropped = depth.best_block(imp["block_loss"][k], k)
    elif cfg.depth_method == "per_layer":
        dropped = depth.least_important([float(x) for x in imp["layer_skip_loss"]], k)
    else:
        dropped = depth.least_important([float(x) for x in imp["block_importance"]], k)
    return [i for i in range(source.num_layers) if i not in set(dropped)]


def param_summary(arch: ModelArch) -> dict[str, int]:
    total = arch.num_parameters()
    non_embedding = arch.num_parameters(include_embeddings=False)
    return {"total": total, "non_embedding": non_embedding, "embedding": total - non_embedding}


def run_prune(
    ckpt: Path,
    out: Path,
    cfg: PruneConfig,
    data: DataSpec,
    tp: int = 1,
    pp: int = 1,
    force: bool = False,
    distill: DistillConfig | None = None,
    dp: int = 1,
    hooks=None,
    ep: int = 1,
) -> dict:
    """Prune the checkpoint `ckpt` into `out`, calibrating on `data.calibration_samples`
    random samples of the train split (the first `depth_eval_samples` of them score depth).

    With `prune.search`, the candidates are searched in `<out>_search/` (resumable; short
    distillations from `ckpt` as the teacher with the `distill` settings) and the winner is
    written to `out`."""
    checkpoint.require_checkpoint(ckpt)
    source = ModelArch.load(ckpt / "arch.yaml")
    ep = ep if source.is_moe else 1  # a dense model calibrates on tp x pp ranks
    source.check_parallel(tp, pp, ep)
    arch, how = plan_architecture(source, cfg, tp, pp)
    drops = {source.num_layers - arch.num_layers}
    if cfg.search is not None:
        if distill is None:
            raise MinitronError("prune.search needs the run's distill settings")
        drops = {
            source.num_layers - a.num_layers
            for a in enumerate_candidates(source, cfg.search, tp, pp)
        }
    build_indices(data, ("calibration",))  # a no-op after the data stage
    calib = calibration_indices(data)
    if cfg.depth_eval_samples >= len(calib):
        raise MinitronError(
            f"prune.depth_eval_samples ({cfg.depth_eval_samples}) must be smaller than the "
            f"calibration set (data.calibration_samples = {len(calib)})"
        )
    depth_indices, width_indices = calib[: cfg.depth_eval_samples], calib[cfg.depth_eval_samples :]
    if cfg.micro_batch_size < ep:
        raise MinitronError(
            f"prune.micro_batch_size ({cfg.micro_batch_size}) must be at least parallel.ep "
            f"({ep}): each calibration micro-batch is split over the expert-parallel ranks"
        )
    started = time.time()
    with atomic.atomic_directory(out, force=force) as tmp:
        imp_path = tmp / "importance.pt"
        previous = (
            _load_importance(Path(cfg.importance), cfg.head_score) if cfg.importance else None
        )
        if previous is not None and previous["aggregation"] != {
            "seq": cfg.aggregation_seq,
            "batch": cfg.aggregation_batch,
        }:
            raise MinitronError(
                f"prune.importance: {cfg.importance} was computed with aggregation "
                f"{previous['aggregation']}, the recipe asks for seq={cfg.aggregation_seq}, "
                f"batch={cfg.aggregation_batch}"
            )
        # Block losses for every k dropped: needed to choose by block, and (with depth_scores) for
        # the report's block vs per-layer comparison; a reused importance file may have them.
        choose_by_block = cfg.drop_layers is None and cfg.depth_method == "block"
        have_blocks = (previous or {}).get("block_loss") or {}
        missing = sorted(k for k in drops if k > 0 and k not in have_blocks)
        block_sizes = missing if choose_by_block or cfg.depth_scores else []
        want_skip = (cfg.depth_scores or cfg.depth_method == "per_layer") and (
            previous is None or previous.get("layer_skip_loss") is None
        )
        if previous is None or block_sizes or want_skip:
            run_on_ranks(
                _calibrate_on_rank,
                tp * pp * ep,
                ckpt,
                data,
                width_indices,
                depth_indices,
                cfg,
                tp,
                pp,
                previous is None,
                block_sizes,
                want_skip,
                previous,
                imp_path,
                ep,
            )
        else:
            torch.save(previous, imp_path)
        imp = _load_importance(imp_path, cfg.head_score)
        if cfg.search is not None:
            from minitron_nemo.prune.search import run_search

            work = out.parent / f"{out.name}_search"
            found = run_search(
                ckpt,
                imp_path,
                imp,
                cfg,
                distill,
                ckpt,
                data,
                work,
                choose_layers,
                tp=tp,
                pp=pp,
                dp=dp,
                hooks=hooks,
                ep=ep,
            )
            how = {**how, "search": found}
            arch = ModelArch.load(Path(found["chosen_dir"]) / "ckpt" / "arch.yaml")
        layers = choose_layers(source, arch, cfg, imp)
        plan = select(source, arch, imp["heads"], imp["neurons"], imp["channels"], layers,
                      imp.get("experts"), cfg.expert_score)  # fmt: skip
        if cfg.search is not None:  # the winner's checkpoint, as sliced for the search
            shutil.copytree(Path(found["chosen_dir"]) / "ckpt", tmp / "ckpt")
        else:
            write_pruned_checkpoint(
                ckpt, plan, imp["heads"], cfg.merge_pruned_heads, tmp / "ckpt", tp=tp, pp=pp
            )
        if cfg.hf_output:
            mcore_to_hf(tmp / "ckpt", tmp / "hf")
        report = _report(source, plan, imp, cfg, how, tmp, time.time() - started)
    log.info("pruned %s -> %s", ckpt, out)
    return report


def _expert_report(source: ModelArch, plan: PrunePlan, cfg: PruneConfig) -> dict:
    """The MoE part of the prune report: which score ranked the experts, the experts each layer
    kept, total and active parameters (active: per token, model-card convention)."""
    if not source.is_moe:
        return {}
    return {
        "expert_score": cfg.expert_score,
        "kept_experts": {str(i): plan.experts[i] for i in sorted(plan.experts)},
        "active_params_before": source.num_parameters(active=True),
        "active_params_after": plan.arch.num_parameters(active=True),
    }


def _report(
    source: ModelArch,
    plan: PrunePlan,
    imp: dict,
    cfg: PruneConfig,
    how: dict,
    out: Path,
    seconds: float,
) -> dict:
    skip = imp.get("layer_skip_loss")
    blocks = imp.get("block_loss") or {}
    k = source.num_layers - plan.arch.num_layers
    comparison = {}
    if k and skip is not None and k in blocks:
        comparison = {
            "block": depth.best_block(blocks[k], k),
            "block_loss": min(blocks[k]),
            "per_layer": depth.least_important([float(x) for x in skip], k),
            "block_importance": depth.least_important(
                [float(x) for x in imp["block_importance"]], k
            ),
        }
    report = {
        "source_arch": source.to_dict(),
        "pruned_arch": plan.arch.to_dict(),
        "params_before": param_summary(source),
        "params_after": param_summary(plan.arch),
        "kept_layers": plan.layers,
        "dropped_layers": plan.dropped_layers,
        "depth_method": cfg.depth_method if cfg.drop_layers is None else "drop_layers",
        "depth_selection_comparison": comparison,
        "kept_channels": len(plan.channels),
        "aggregation": imp["aggregation"],
        "head_score": imp["head_score"],
        "calibration_samples": imp["num_samples"],
        "seq_length": imp["seq_length"],
        "calibration_seconds": imp.get("calibration_seconds"),
        "block_importance": [float(x) for x in imp["block_importance"]],
        "base_loss": imp.get("base_loss"),
        "layer_skip_loss": [float(x) for x in skip] if skip is not None else None,
        "block_loss": {str(kk): v for kk, v in blocks.items()},
        "merge_pruned_heads": cfg.merge_pruned_heads,
        **_expert_report(source, plan, cfg),
        "seconds": seconds,
        **how,
        "config": asdict(cfg),
    }
    (out / "prune_report.json").write_text(json.dumps(report, indent=2))
    if cfg.plots:
        _plot(source, plan, imp, cfg, how, out / "plots")
    return report


def _plot(
    source: ModelArch, plan: PrunePlan, imp: dict, cfg: PruneConfig, how: dict, plot_dir: Path
) -> None:
    """The prune stage's PNGs (prune.plots): importance maps, depth scores, parameter counts,
    expert importance and the search's curves where there are any."""
    plot_dir.mkdir(exist_ok=True)
    skip = imp.get("layer_skip_loss")
    blocks = imp.get("block_loss") or {}
    plots.heatmap(
        imp["heads"], f"attention head importance ({imp['head_score']})", "head",
        plot_dir / "heads.png",
    )  # fmt: skip
    plots.heatmap(imp["neurons"], "MLP neuron importance", "neuron", plot_dir / "neurons.png")
    plots.heatmap(
        imp["channels_per_layer"],
        "embedding channel importance (per layer norms)",
        "channel",
        plot_dir / "channels.png",
    )
    plots.depth_scores(
        [float(x) for x in imp["block_importance"]],
        [float(x) for x in skip] if skip is not None else None,
        imp.get("base_loss"),
        blocks,
        plan.dropped_layers,
        plot_dir / "depth.png",
    )
    plots.param_counts(param_summary(source), param_summary(plan.arch), plot_dir / "params.png")
    if imp.get("experts"):
        layers = sorted(imp["experts"])
        score = cfg.expert_score if cfg.expert_score in imp["experts"][layers[0]] else "reap"
        plots.heatmap(
            torch.stack([imp["experts"][i][score] for i in layers]),
            f"routed expert importance ({score}; rows: MoE layers {layers[0]}..{layers[-1]})",
            "expert",
            plot_dir / "experts.png",
        )
    found = how.get("search")
    if found:
        plots.curves(
            {
                f"{c['name']} ({c['params'] / 1e6:.1f}M)": tuple(zip(*c["curve"], strict=True))
                for c in found["candidates"]
                if c["curve"]
            },
            "architecture search: held-out loss along the short distillation",
            "distillation step",
            "held-out loss",
            plot_dir / "search.png",
        )
