"""`minitron validate`: check a recipe without running it (CI validates every recipe)."""

from __future__ import annotations

import json
from pathlib import Path

from minitron_nemo.config import RunConfig, load_config
from minitron_nemo.distill.train import check_config as check_distill
from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.prune.importance import check_aggregation
from minitron_nemo.prune.stage import DEPTH_METHODS, plan_architecture


def known_teacher_arch(cfg: RunConfig) -> ModelArch | None:
    """The teacher's architecture when it can be known without loading weights."""
    from minitron_nemo.models.families import family_for_config

    if cfg.teacher == "smollm2":
        from minitron_nemo.data.sources import cache_dir

        path = cache_dir() / "SmolLM2-135M-Instruct-hf" / "config.json"
    else:
        path = Path(cfg.teacher) / "config.json"
    if not path.is_file():
        arch = cfg.extra.get("teacher_arch")
        return ModelArch.from_dict(dict(arch), source="extra.teacher_arch") if arch else None
    raw = json.loads(path.read_text())
    return family_for_config(raw, str(path)).arch_from_config(raw, str(path))


def validate_recipe(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """Load the recipe and check every value that can be checked here; raise on the first."""
    cfg = load_config(path, overrides)
    where = str(path)
    p, d, pr = cfg.parallel, cfg.distill, cfg.prune
    if min(p.tp, p.pp, p.dp) < 1:
        raise MinitronError(f"{where}: parallel sizes must be >= 1")
    if cfg.dtype not in ("fp32", "bf16", "auto"):
        raise MinitronError(f"{where}: dtype: expected fp32, bf16 or auto, got {cfg.dtype!r}")
    if pr.depth_method not in DEPTH_METHODS:
        raise MinitronError(f"{where}: prune.depth_method: expected one of {DEPTH_METHODS}")
    check_aggregation(pr.aggregation_seq, f"{where}: prune.aggregation_seq")
    check_aggregation(pr.aggregation_batch, f"{where}: prune.aggregation_batch")
    if d.fp8 is None:
        check_distill(d)
    elif d.fp8 not in ("hybrid", "e4m3"):
        raise MinitronError(f"{where}: distill.fp8: expected hybrid or e4m3, got {d.fp8!r}")
    if d.global_batch_size % (d.micro_batch_size * p.dp):
        raise MinitronError(
            f"{where}: distill.global_batch_size {d.global_batch_size} is not a multiple of "
            f"micro_batch_size x parallel.dp = {d.micro_batch_size} x {p.dp}"
        )
    data = cfg.data
    if data.heldout_samples + data.calibration_samples <= 0 or data.seq_length <= 0:
        raise MinitronError(f"{where}: data sizes must be positive")
    arch = known_teacher_arch(cfg)
    if arch is not None:
        try:
            arch.check_parallel(p.tp, p.pp)
            plan_architecture(arch, pr, p.tp, p.pp)
        except MinitronError as exc:
            raise MinitronError(f"{where}: {exc}") from None
    return cfg
