"""Megatron checkpoint (saved at any TP/PP) -> HF directory that transformers loads offline."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from minitron_nemo import atomic, checkpoint
from minitron_nemo.convert import transforms
from minitron_nemo.convert.safetensors_io import ShardedSafetensorsWriter
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.families import family_by_name
from minitron_nemo.runtime.diskspace import model_bytes, require_free, translate_disk_full

log = logging.getLogger(__name__)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def hf_state_dict_items(model: torch.nn.Module, arch: ModelArch):
    """Yield (HF name, tensor) for a full (TP=1, PP=1) megatron model, in HF layer order."""
    family = family_by_name(arch.family)
    params = dict(model.named_parameters())
    for rule in family.rules(arch):
        for layer in range(arch.num_layers) if rule.per_layer else [None]:
            tensor = params[rule.mcore_name(layer)].detach()
            hf = transforms.mcore_to_hf(rule, tensor, arch)
            yield from zip(rule.hf_names(layer), hf, strict=True)


def write_hf_config(arch: ModelArch, dtype: torch.dtype, out: Path) -> None:
    from transformers import AutoConfig

    family = family_by_name(arch.family)
    config = AutoConfig.for_model(family.model_type, **family.hf_config_kwargs(arch))
    config.dtype = dtype
    config.save_pretrained(out)


def write_hf_dir(
    tensors: Iterable[tuple[str, torch.Tensor]],
    arch: ModelArch,
    dtype: torch.dtype,
    out: Path,
    tokenizer_dir: Path | None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write HF-named tensors as safetensors shards + config.json + tokenizer into `out`."""
    writer = ShardedSafetensorsWriter(out, max_shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor.to(device="cpu", dtype=dtype).clone())
    writer.close()
    write_hf_config(arch, dtype, out)
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        checkpoint.copy_tokenizer(tokenizer_dir, out)


def mcore_to_hf(
    ckpt: Path,
    out: Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Export a checkpoint directory to `out` (safetensors + config.json + tokenizer)."""
    from minitron_nemo.runtime import distributed

    start = time.time()
    ckpt = Path(ckpt)
    checkpoint.require_checkpoint(ckpt)
    arch = ModelArch.load(ckpt / "arch.yaml")
    needed = model_bytes(arch, dtype or checkpoint.checkpoint_dtype(ckpt))
    require_free(Path(out).parent, needed)
    with (
        atomic.atomic_directory(Path(out), force=force) as tmp,
        translate_disk_full(Path(out).parent, needed),
    ):
        with distributed.initialize(tp=1, pp=1):
            model, arch = checkpoint.load_model(ckpt, dtype=dtype, use_te=False)
            out_dtype = dtype or checkpoint.checkpoint_dtype(ckpt)
            write_hf_dir(
                hf_state_dict_items(model, arch),
                arch,
                out_dtype,
                tmp,
                ckpt / "tokenizer",
                max_shard_bytes,
            )
    log.info("exported %s -> %s in %.1f s", ckpt, out, time.time() - start)
    return Path(out)
