"""The megatron checkpoint directory of this project, written atomically.

Layout::

    ckpt/
      arch.yaml      the architecture (models/arch.py)
      meta.yaml      dtype, TP/PP it was saved at, where it came from
      weights/       megatron dist-checkpoint (loads at any TP/PP)
      tokenizer/     tokenizer files, copied as they were
      DONE           written last; a directory without it is never used

Every directory is built under a hidden `.NAME.incomplete` sibling and renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from minitron_nemo.atomic import DONE, is_complete
from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def require_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise MinitronError(f"{path}: checkpoint directory not found")
    if not is_complete(path):
        raise MinitronError(f"{path}: incomplete checkpoint (no {DONE} marker); re-create it")


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the tokenizer files found in `src_dir`; returns their names."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def write_meta(ckpt: Path, arch: ModelArch, dtype: torch.dtype, **extra: Any) -> None:
    arch.save(ckpt / "arch.yaml")
    meta = {"format": "minitron-mcore/1", "dtype": DTYPE_NAMES[dtype], **extra}
    (ckpt / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


def read_meta(ckpt: Path) -> dict[str, Any]:
    return yaml.safe_load((ckpt / "meta.yaml").read_text()) or {}


def checkpoint_dtype(ckpt: Path) -> torch.dtype:
    name = read_meta(ckpt).get("dtype", "fp32")
    return {v: k for k, v in DTYPE_NAMES.items()}[name]


def save_weights(model: torch.nn.Module, weights_dir: Path) -> None:
    """megatron dist-checkpoint of this rank's model shard (collective over all ranks)."""
    from megatron.core import dist_checkpointing

    weights_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(weights_dir))


def load_weights(model: torch.nn.Module, weights_dir: Path) -> None:
    """Fill this rank's model shard from a dist-checkpoint saved at any TP/PP."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    state = dist_checkpointing.load(sharded, str(weights_dir))
    # A training checkpoint also holds the optimizer's common (non-sharded) state: skip it.
    model.load_state_dict({k: v for k, v in state.items() if k in sharded})


def load_model(
    ckpt: Path,
    dtype: torch.dtype | None = None,
    use_te: bool | None = None,
    fp8: str | None = None,
) -> tuple[torch.nn.Module, ModelArch]:
    """Build this rank's model for the checkpoint's arch and load its weights."""
    from minitron_nemo.models.build import build_model

    require_checkpoint(ckpt)
    arch = ModelArch.load(ckpt / "arch.yaml")
    model = build_model(arch, dtype or checkpoint_dtype(ckpt), use_te=use_te, fp8=fp8)
    load_weights(model, ckpt / "weights")
    return model, arch
