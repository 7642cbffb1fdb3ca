"""Megatron checkpoint (saved at any TP/PP) -> HF directory that transformers loads offline."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from minitron_nemo import atomic, checkpoint
from minitron_nemo.convert import transforms
from minitron_nemo.convert.safetensors_io import StreamingSafetensorsWriter
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.families import family_by_name
from minitron_nemo.models.families.base import layer_items
from minitron_nemo.report.model_card import basic_card, write_card
from minitron_nemo.runtime.diskspace import model_bytes, require_free, translate_disk_full

log = logging.getLogger(__name__)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _groups(arch: ModelArch):
    """(layer, [(rule, expert), ...]) read together, in HF file order: the leading
    whole-model rules (embedding) one by one, then each layer's parameters (all its experts
    included), then the trailing ones (final norm, output layer) one by one."""
    rules = family_by_name(arch.family).rules(arch)
    first = next(i for i, r in enumerate(rules) if r.per_layer)
    yield from ((None, [(r, None)]) for r in rules[:first] if not r.per_layer)
    yield from ((layer, layer_items(rules, arch, layer)) for layer in range(arch.num_layers))
    yield from ((None, [(r, None)]) for r in rules[first:] if not r.per_layer)


def _hf_pieces(rule, layer, expert, tensor, arch: ModelArch):
    names = rule.hf_names(layer, expert)
    return zip(names, transforms.mcore_to_hf(rule, tensor, arch), strict=True)


def hf_tensors(reader, arch: ModelArch, dtype: torch.dtype):
    """Yield (HF name, tensor in `dtype`) from a checkpoint reader, one group at a time."""
    for layer, items in _groups(arch):
        tensors = reader.read([rule.mcore_name(layer, e) for rule, e in items])
        for rule, e in items:
            for name, t in _hf_pieces(rule, layer, e, tensors[rule.mcore_name(layer, e)], arch):
                yield name, t.to(dtype)


def hf_plan(reader, arch: ModelArch, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
    """(HF name, shape, dtype) of every tensor `hf_tensors` yields, in the same order, from
    metadata only (the transforms run on meta tensors)."""
    plan = []
    for layer, items in _groups(arch):
        for rule, e in items:
            meta = torch.empty(reader.shape(rule.mcore_name(layer, e))[0], device="meta")
            plan += [(n, tuple(t.shape), dtype) for n, t in _hf_pieces(rule, layer, e, meta, arch)]
    return plan


def write_hf_config(arch: ModelArch, dtype: torch.dtype, out: Path) -> None:
    from transformers import AutoConfig

    family = family_by_name(arch.family)
    config = AutoConfig.for_model(family.model_type, **family.hf_config_kwargs(arch))
    config.dtype = dtype
    config.save_pretrained(out)


def mcore_to_hf(
    ckpt: Path,
    out: Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Export a checkpoint directory (saved at any TP/PP) to `out` (safetensors shards +
    config.json + tokenizer), streaming: one layer of the source is in memory at a time and
    each tensor goes straight to its place in its shard."""
    from minitron_nemo.convert.checkpoint_tensors import CheckpointTensors
    from minitron_nemo.runtime import distributed

    start = time.time()
    ckpt = Path(ckpt)
    checkpoint.require_checkpoint(ckpt)
    arch = ModelArch.load(ckpt / "arch.yaml")
    out_dtype = dtype or checkpoint.checkpoint_dtype(ckpt)
    needed = model_bytes(arch, out_dtype)
    require_free(Path(out).parent, needed)
    with (
        atomic.atomic_directory(Path(out), force=force) as tmp,
        translate_disk_full(Path(out).parent, needed),
        distributed.initialize(tp=1, pp=1),
    ):
        reader = CheckpointTensors(ckpt / "weights")
        writer = StreamingSafetensorsWriter(tmp, hf_plan(reader, arch, out_dtype), max_shard_bytes)
        for name, tensor in hf_tensors(reader, arch, out_dtype):
            writer.add(name, tensor)
        writer.close()
        write_hf_config(arch, out_dtype, tmp)
        if (ckpt / "tokenizer").is_dir():
            checkpoint.copy_tokenizer(ckpt / "tokenizer", tmp)
        write_card(tmp, basic_card(arch, str(ckpt)))
    log.info("exported %s -> %s in %.1f s", ckpt, out, time.time() - start)
    return Path(out)
