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
# A routed expert of megatron's SequentialMLP: `<pre>local_experts.<e>.<post>`.
LOCAL_EXPERT = re.compile(r"^(?P<pre>.*\.)local_experts\.(?P<e>\d+)\.(?P<post>.+)$")


def _keys_map() -> dict[str, str]:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return dict(spec.submodules.sharded_state_dict_keys_map or {})


def checkpoint_key(
    param_name: str, keys_map: dict[str, str], stored: set[str] | dict | None = None
) -> tuple[str, list[int]]:
    """(checkpoint key, indices along its leading axes) of a megatron parameter name.

    `decoder.layers.3.x` -> (`decoder.layers.x`, [3]): the layers of a homogeneous model are
    stacked along a leading axis. A model mixing MoE and dense layers is saved per layer
    (`decoder.layers.3.x`, no layer axis: megatron's non-homogeneous layout), which is used
    when `stored` (the checkpoint's keys) has it. A routed expert's parameters
    (`...mlp.experts.local_experts.E.linear_fc1.weight`, E global) are stacked along one more
    axis (`...mlp.experts.experts.linear_fc1.weight`, index E)."""
    m = _LAYER.match(param_name)
    if m is None:
        return param_name, []
    layer, rest = int(m.group(1)), m.group(2)
    for old, new in keys_map.items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
    expert = LOCAL_EXPERT.match(rest)
    axes = []
    if expert:
        rest = f"{expert['pre']}experts.{expert['post']}"
        axes = [int(expert["e"])]
    per_layer_key = f"decoder.layers.{layer}.{rest}"
    if stored is not None and per_layer_key in stored:
        return per_layer_key, axes
    return f"decoder.layers.{rest}", [layer, *axes]


class CheckpointTensors:
    """Reads full tensors by megatron parameter name (needs torch.distributed initialised,
    e.g. a world of one). Experts are named by their global index."""

    def __init__(self, weights_dir: Path) -> None:
        from megatron.core import dist_checkpointing

        self.dir = str(weights_dir)
        self.metadata = dist_checkpointing.load_tensors_metadata(self.dir)
        self.keys_map = _keys_map()

    def _entry(self, name: str):
        key, axes = checkpoint_key(name, self.keys_map, self.metadata)
        if key not in self.metadata:
            raise MinitronError(f"{self.dir}: the checkpoint has no tensor {key!r} (for {name})")
        return key, axes, self.metadata[key]

    def shape(self, name: str) -> tuple[torch.Size, torch.dtype]:
        """Shape (of one layer / expert for stacked parameters) and dtype, without reading."""
        _key, axes, meta = self._entry(name)
        return torch.Size(meta.global_shape[len(axes) :]), meta.dtype

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The full tensors of `names`, in one load."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        # One request per (key, layer): all experts of a layer are read together (one layer
        # of the model), then split; a key is sliced along its layer axis only.
        request, where = {}, {}
        for name in names:
            key, axes, meta = self._entry(name)
            shape = tuple(meta.global_shape)
            layer_axes = [] if _LAYER.match(key) else axes[:1]  # stacked layers: axis 0
            expert_axes = axes[len(layer_axes) :]
            request_key = f"{key}@{'.'.join(map(str, layer_axes))}"
            if request_key not in request:
                local = torch.empty(
                    (*[1] * len(layer_axes), *shape[len(layer_axes) :]), dtype=meta.dtype
                )
                offsets = [(axis, index, shape[axis]) for axis, index in enumerate(layer_axes)]
                request[request_key] = ShardedTensor.from_rank_offsets(
                    key, local, *offsets, replica_id=0
                )
            where[name] = (request_key, len(layer_axes), expert_axes)
        loaded = dist_checkpointing.load(request, self.dir, validate_access_integrity=False)
        out = {}
        for name, (request_key, n_layer_axes, expert_axes) in where.items():
            tensor = loaded[request_key]
            for index in [0] * n_layer_axes + expert_axes:
                tensor = tensor[index]
            out[name] = tensor.clone() if expert_axes else tensor
        return out
