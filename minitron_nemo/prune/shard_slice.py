"""Write the pruned checkpoint on the shards: every rank builds its shard (TP slice, PP stage) of
the pruned model and fills it itself; no process ever holds the whole model.

Each rank runs the converter's own `load_hf_weights` (convert/hf_to_mcore.py) over a reader that
serves the pruned model's HF-named tensors: the first request for pruned layer j reads source
layer plan.layers[j] from the source dist-checkpoint (saved at any TP/PP; one layer in one load),
converts it to HF layout and slices it (prune/slice.py). So the result is the one the old path
(slice the whole model in HF layout, write an HF directory, convert it) gave, bit for bit, while
a rank holds its shard plus one source layer. Depth pruning re-balances the pipeline stages by
construction: the pruned model is built for the run's PP.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from minitron_nemo import atomic, checkpoint
from minitron_nemo.convert import transforms
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.models.families import family_by_name
from minitron_nemo.models.families.base import layer_items
from minitron_nemo.prune.select import PrunePlan
from minitron_nemo.prune.slice import slice_global, slice_layer
from minitron_nemo.runtime.launch import run_on_ranks

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class PrunedTensors:
    """HF-named tensors of the pruned model, sliced from the source checkpoint on demand, one
    source layer cached at a time (the converter asks for them layer by layer)."""

    def __init__(self, weights_dir: Path, source: ModelArch, plan: PrunePlan, head_scores,
                 merge_heads: bool) -> None:  # fmt: skip
        from minitron_nemo.convert.checkpoint_tensors import CheckpointTensors

        self.reader = CheckpointTensors(weights_dir)
        self.source, self.plan = source, plan
        self.head_scores, self.merge_heads = head_scores, merge_heads
        self.rules = family_by_name(source.family).rules(source)
        self._layer: int | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def _source_hf(self, layer: int | None) -> dict[str, torch.Tensor]:
        """Source HF tensors of one layer (or of the whole-model rules), one load."""
        if layer is None:
            items = [(r, None) for r in self.rules if not r.per_layer]
        else:
            items = layer_items(self.rules, self.source, layer)
        loaded = self.reader.read([r.mcore_name(layer, e) for r, e in items])
        out = {}
        for rule, e in items:
            hf = transforms.mcore_to_hf(rule, loaded[rule.mcore_name(layer, e)], self.source)
            out.update(zip(rule.hf_names(layer, e), hf, strict=True))
        return out

    def get(self, name: str) -> torch.Tensor:
        m = _HF_LAYER.match(name)
        layer = int(m.group(1)) if m else None
        if layer != self._layer or name not in self._tensors:
            if layer is None:
                self._tensors = slice_global(self._source_hf(None), self.source, self.plan)
            else:
                i = self.plan.layers[layer]
                self._tensors = slice_layer(
                    self._source_hf(i), i, layer, self.source, self.plan, self.head_scores,
                    self.merge_heads,
                )  # fmt: skip
            self._layer = layer
        return self._tensors[name]


def _slice_on_rank(
    source_ckpt: Path, source: ModelArch, plan: PrunePlan, head_scores, merge_heads: bool,
    dtype: torch.dtype, weights_dir: Path, tp: int, pp: int,
) -> None:  # fmt: skip
    from minitron_nemo.convert.hf_to_mcore import load_hf_weights
    from minitron_nemo.models.build import build_model
    from minitron_nemo.runtime import distributed

    with distributed.initialize(tp=tp, pp=pp):
        model = build_model(plan.arch, dtype, use_te=False)
        tensors = PrunedTensors(source_ckpt / "weights", source, plan, head_scores, merge_heads)
        load_hf_weights(model, plan.arch, tensors)
        checkpoint.save_weights(model, weights_dir)


def write_pruned_checkpoint(
    source_ckpt: Path,
    plan: PrunePlan,
    head_scores,
    merge_heads: bool,
    out: Path,
    tp: int = 1,
    pp: int = 1,
) -> None:
    """The pruned model as a checkpoint directory at TP/PP, sliced on the shards."""
    source = ModelArch.load(source_ckpt / "arch.yaml")
    dtype = checkpoint.checkpoint_dtype(source_ckpt)
    with atomic.atomic_directory(out) as tmp:
        run_on_ranks(
            _slice_on_rank, tp * pp, source_ckpt, source, plan, head_scores, merge_heads, dtype,
            tmp / "weights", tp, pp,
        )  # fmt: skip
        checkpoint.write_meta(
            tmp, plan.arch, dtype, saved_tp=tp, saved_pp=pp, source=f"pruned from {source_ckpt}"
        )
        checkpoint.copy_tokenizer(source_ckpt / "tokenizer", tmp / "tokenizer")
