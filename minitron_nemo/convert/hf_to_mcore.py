"""HF directory -> megatron dist-checkpoint at any TP/PP, streaming tensor by tensor.

Everything that can be wrong with the input is checked in the parent process before any rank
starts (config, architecture, tensor names, truncated files, TP/PP divisibility). Each rank
then builds only its shard of the model and reads only the HF tensors it needs, one at a time,
so peak memory is this rank's model shard plus one tensor.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minitron_nemo import atomic, checkpoint
from minitron_nemo.convert import transforms
from minitron_nemo.convert.checkpoint_tensors import LOCAL_EXPERT
from minitron_nemo.convert.safetensors_io import SafetensorsReader
from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.build import DTYPES
from minitron_nemo.models.families import Family, family_by_name, family_for_config
from minitron_nemo.models.families.base import Rule, read_config
from minitron_nemo.runtime.diskspace import model_bytes, require_free, translate_disk_full
from minitron_nemo.runtime.launch import run_on_ranks

log = logging.getLogger(__name__)
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")


@dataclass(frozen=True)
class ConversionPlan:
    """Validated inputs of one conversion."""

    hf_dir: Path
    arch: ModelArch
    dtype: torch.dtype
    tp: int
    pp: int
    ep: int = 1

    @property
    def world_size(self) -> int:
        """Ranks the conversion runs on: every TP x PP shard, and EP copies of it for MoE
        models (each holds its own experts; the dense weights are saved once)."""
        return self.tp * self.pp * self.ep


def plan_conversion(
    hf_dir: Path, tp: int, pp: int, dtype: str = "auto", ep: int = 1
) -> ConversionPlan:
    """Read and check the HF directory; raise one MinitronError for the first problem."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise MinitronError(f"{hf_dir}: not a directory")
    raw = read_config(hf_dir)
    source = str(hf_dir / "config.json")
    family = family_for_config(raw, source)
    arch = family.arch_from_config(raw, source)
    arch.check_parallel(tp, pp, ep)
    reader = SafetensorsReader(hf_dir)
    check_tensor_names(family, arch, reader.names(), hf_dir)
    if dtype == "auto":
        resolved = torch.bfloat16 if reader.dtype() == torch.bfloat16 else torch.float32
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise MinitronError(f"--dtype: expected one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return ConversionPlan(hf_dir, arch, resolved, tp, pp, ep)


def check_tensor_names(family: Family, arch: ModelArch, present: list[str], where: Path) -> None:
    expected = family.expected_hf_tensors(arch)
    missing = [n for n in expected if n not in set(present)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MinitronError(f"{where}: missing tensor {missing[0]!r}{more}")
    extra = sorted(set(present) - set(expected))
    extra = [n for n in extra if not family.is_ignorable(n, arch)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise MinitronError(
            f"{where}: unexpected tensor {extra[0]!r}{more} for a {family.name} model with "
            f"{arch.num_layers} layers"
        )


def global_expert(local_expert: int, num_local_experts: int) -> int:
    """The global index of this rank's local expert: megatron gives EP rank r the contiguous
    experts [r * num_local, (r + 1) * num_local). The one place that maps experts to ranks."""
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_rank() * num_local_experts + local_expert


def global_name(local_name: str, model: torch.nn.Module) -> tuple[str, int | None, int | None]:
    """(name with '*' for the layer and '<e>' for the expert index, global layer, global
    expert) of a local parameter name."""
    match = _LAYER.fullmatch(local_name)
    if not match:
        return local_name, None, None
    local = int(match.group(1))
    block = model.decoder.layers[local]
    layer = block.layer_number - 1  # layer_number is global, 1-based
    rest, expert = match.group(2), None
    expert_match = LOCAL_EXPERT.match(rest)
    if expert_match:
        num_local = len(block.mlp.experts.local_experts)
        expert = global_expert(int(expert_match["e"]), num_local)
        rest = f"{expert_match['pre']}local_experts.<e>.{expert_match['post']}"
    return f"decoder.layers.*.{rest}", layer, expert


def rules_by_mcore_name(family: Family, arch: ModelArch) -> dict[str, Rule]:
    rules = {rule.mcore: rule for rule in family.rules(arch)}
    if arch.tie_embeddings:
        # With PP > 1 the last stage holds its own copy of the tied embedding.
        rules["output_layer.weight"] = rules["embedding.word_embeddings.weight"]
    return rules


def load_hf_weights(model: torch.nn.Module, arch: ModelArch, reader: SafetensorsReader) -> None:
    """Fill this rank's model shard from HF tensors, one parameter at a time."""
    from megatron.core import parallel_state

    family = family_by_name(arch.family)
    rules = rules_by_mcore_name(family, arch)
    tp = (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    # Experts are split over megatron's expert-tensor-parallel group (its size defaults to TP).
    expert_tp = (
        parallel_state.get_expert_tensor_parallel_rank(),
        parallel_state.get_expert_tensor_parallel_world_size(),
    )
    for local_name, param in model.named_parameters():
        pattern, layer, expert = global_name(local_name, model)
        if pattern not in rules:
            raise RuntimeError(f"no conversion rule for megatron parameter {local_name}")
        rule = rules[pattern]
        names = rule.hf_names(layer, expert)
        hf = [reader.get(n) for n in names]
        full = transforms.hf_to_mcore(rule, hf, arch)
        tp_rank, tp_size = expert_tp if rule.per_expert else tp
        shard = transforms.tp_shard(full, param, rule, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise MinitronError(
                f"{names[0]}: shape {tuple(hf[0].shape)} does not fit megatron "
                f"{local_name} {tuple(param.shape)} (check config.json)"
            )
        with torch.no_grad():
            param.copy_(shard)


def _convert_on_rank(plan: ConversionPlan, tmp: Path) -> None:
    from minitron_nemo.models.build import build_model
    from minitron_nemo.runtime import distributed

    with distributed.initialize(plan.tp, plan.pp, ep=plan.ep):
        model = build_model(plan.arch, plan.dtype, use_te=False)
        load_hf_weights(model, plan.arch, SafetensorsReader(plan.hf_dir))
        checkpoint.save_weights(model, tmp / "weights")


def hf_to_mcore(
    hf_dir: Path,
    out: Path,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "auto",
    force: bool = False,
    ep: int = 1,
) -> ModelArch:
    """Convert an HF directory into a checkpoint directory (see checkpoint.py); MoE models
    may be sharded over `ep` expert-parallel ranks."""
    start = time.time()
    plan = plan_conversion(Path(hf_dir), tp, pp, dtype, ep)
    needed = model_bytes(plan.arch, plan.dtype)
    require_free(Path(out).parent, needed)
    with (
        atomic.atomic_directory(Path(out), force=force) as tmp,
        translate_disk_full(Path(out).parent, needed),
    ):
        run_on_ranks(_convert_on_rank, plan.world_size, plan, tmp)
        checkpoint.copy_tokenizer(plan.hf_dir, tmp / "tokenizer")
        checkpoint.write_meta(
            tmp, plan.arch, plan.dtype, saved_tp=tp, saved_pp=pp, saved_ep=ep,
            source=str(plan.hf_dir),
        )  # fmt: skip
    log.info("converted %s -> %s in %.1f s", hf_dir, out, time.time() - start)
    return plan.arch
