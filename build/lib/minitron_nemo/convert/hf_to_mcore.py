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


def plan_conversion(hf_dir: Path, tp: int, pp: int, dtype: str = "auto") -> ConversionPlan:
    """Read and check the HF directory; raise one MinitronError for the first problem."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise MinitronError(f"{hf_dir}: not a directory")
    raw = read_config(hf_dir)
    source = str(hf_dir / "config.json")
    family = family_for_config(raw, source)
    arch = family.arch_from_config(raw, source)
    arch.check_parallel(tp, pp)
    reader = SafetensorsReader(hf_dir)
    check_tensor_names(family, arch, reader.names(), hf_dir)
    if dtype == "auto":
        resolved = torch.bfloat16 if reader.dtype() == torch.bfloat16 else torch.float32
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise MinitronError(f"--dtype: expected one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return ConversionPlan(hf_dir, arch, resolved, tp, pp)


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


def global_name(local_name: str, model: torch.nn.Module) -> tuple[str, int | None]:
    """(name with '*' for the layer index, global layer index) of a local parameter name."""
    match = _LAYER.fullmatch(local_name)
    if not match:
        return local_name, None
    local = int(match.group(1))
    layer = model.decoder.layers[local].layer_number - 1  # layer_number is global, 1-based
    return f"decoder.layers.*.{match.group(2)}", layer


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
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for local_name, param in model.named_parameters():
        pattern, layer = global_name(local_name, model)
        if pattern not in rules:
            raise RuntimeError(f"no conversion rule for megatron parameter {local_name}")
        rule = rules[pattern]
        hf = [reader.get(n) for n in rule.hf_names(layer)]
        full = transforms.hf_to_mcore(rule, hf, arch)
        shard = transforms.tp_shard(full, param, rule, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise MinitronError(
                f"{rule.hf_names(layer)[0]}: shape {tuple(hf[0].shape)} does not fit megatron "
                f"{local_name} {tuple(param.shape)} (check config.json)"
            )
        with torch.no_grad():
            param.copy_(shard)


def _convert_on_rank(plan: ConversionPlan, tmp: Path) -> None:
    from minitron_nemo.models.build import build_model
    from minitron_nemo.runtime import distributed

    with distributed.initialize(plan.tp, plan.pp):
        model = build_model(plan.arch, plan.dtype, use_te=False)
        load_hf_weights(model, plan.arch, SafetensorsReader(plan.hf_dir))
        checkpoint.save_weights(model, tmp / "weights")


def hf_to_mcore(
    hf_dir: Path, out: Path, tp: int = 1, pp: int = 1, dtype: str = "auto", force: bool = False
) -> ModelArch:
    """Convert an HF directory into a checkpoint directory (see checkpoint.py)."""
    start = time.time()
    plan = plan_conversion(Path(hf_dir), tp, pp, dtype)
    needed = model_bytes(plan.arch, plan.dtype)
    require_free(Path(out).parent, needed)
    with (
        atomic.atomic_directory(Path(out), force=force) as tmp,
        translate_disk_full(Path(out).parent, needed),
    ):
        run_on_ranks(_convert_on_rank, tp * pp, plan, tmp)
        checkpoint.copy_tokenizer(plan.hf_dir, tmp / "tokenizer")
        checkpoint.write_meta(
            tmp, plan.arch, plan.dtype, saved_tp=tp, saved_pp=pp, source=str(plan.hf_dir)
        )
    log.info("converted %s -> %s in %.1f s", hf_dir, out, time.time() - start)
    return plan.arch
