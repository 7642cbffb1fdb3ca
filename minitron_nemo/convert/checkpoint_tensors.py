"""Full (unsharded) tensors of a megatron dist-checkpoint saved at any TP/PP, read a layer at a
time: the export and the shard-local pruning never hold more than one layer of the source.

In the checkpoint the per-layer parameters of all layers are one tensor with a leading layer axis
(`decoder.layers.self_attention.linear_qkv.weight` [L, ...]), and the local spec's norms are
stored under TransformerEngine's names (megatron's `sharded_state_dict_keys_map`, read from its
own layer spec). A slice of one layer is loaded through megatron's `dist_checkpointing.load`
with the access-integrity check off (that check wants the whole tensor covered).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from minitron_nemo.errors import MinitronError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _keys_map() -> dict[str, str]:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return dict(spec.submodules.sharded_state_dict_keys_map or {})


def checkpoint_key(param_name: str, keys_map: dict[str, str]) -> tuple[str, int | None]:
    """(checkpoint key, layer) of a megatron parameter name (`decoder.layers.3.x` -> layer 3)."""
    m = _LAYER.match(param_name)
    if m is None:
        return param_name, None
    rest = m.group(2)
    for old, new in keys_map.items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
    return f"decoder.layers.{rest}", int(m.group(1))


class CheckpointTensors:
    """Reads full tensors by megatron parameter name (needs torch.distributed initialised,
    e.g. a world of one)."""

    def __init__(self, weights_dir: Path) -> None:
        from megatron.core import dist_checkpointing

        self.dir = str(weights_dir)
        self.metadata = dist_checkpointing.load_tensors_metadata(self.dir)
        self.keys_map = _keys_map()

    def _entry(self, name: str):
        key, layer = checkpoint_key(name, self.keys_map)
        if key not in self.metadata:
            raise MinitronError(f"{self.dir}: the checkpoint has no tensor {key!r} (for {name})")
        return key, layer, self.metadata[key]

    def shape(self, name: str) -> tuple[torch.Size, torch.dtype]:
        """Shape (of one layer, for per-layer parameters) and dtype, without reading data."""
        _key, layer, meta = self._entry(name)
        shape = meta.global_shape[1:] if layer is not None else meta.global_shape
        return torch.Size(shape), meta.dtype

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The full tensors of `names`, in one load."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        request, where = {}, {}
        for name in names:
            key, layer, meta = self._entry(name)
            shape = tuple(meta.global_shape)
            if layer is None:
                local = torch.empty(shape, dtype=meta.dtype)
                tensor = ShardedTensor.from_rank_offsets(key, local, replica_id=0)
            else:
                local = torch.empty((1, *shape[1:]), dtype=meta.dtype)
                tensor = ShardedTensor.from_rank_offsets(
                    key, local, (0, layer, shape[0]), replica_id=0
                )
            request_key = f"{key}@{layer}"  # one layer of a key per call (see the callers)
            request[request_key] = tensor
            where[name] = (request_key, layer is not None)
        loaded = dist_checkpointing.load(request, self.dir, validate_access_integrity=False)
        return {
            name: loaded[rk][0] if layered else loaded[rk] for name, (rk, layered) in where.items()
        }
