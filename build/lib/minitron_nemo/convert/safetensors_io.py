"""Read HF safetensors lazily (tensor by tensor) and write sharded safetensors atomically."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minitron_nemo.errors import MinitronError

INDEX_NAME = "model.safetensors.index.json"


def _check_complete(path: Path) -> list[str]:
    """Tensor names in one safetensors file; a clear error if the file is cut short."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise MinitronError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise MinitronError(
                f"{path}: truncated safetensors file (header says {header_len} header bytes, "
                f"file has {size})"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MinitronError(f"{path}: corrupt safetensors header ({exc})") from exc
    names = [k for k in header if k != "__metadata__"]
    data_end = max((header[k]["data_offsets"][1] for k in names), default=0)
    expected = 8 + header_len + data_end
    if size < expected:
        raise MinitronError(
            f"{path}: truncated safetensors file (expected {expected} bytes, found {size})"
        )
    return names


class SafetensorsReader:
    """All tensors of an HF directory (single file or sharded with an index), read lazily."""

    def __init__(self, hf_dir: Path) -> None:
        self.hf_dir = hf_dir
        index = hf_dir / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({hf_dir / f for f in weight_map.values()})
        else:
            files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise MinitronError(f"{hf_dir}: no *.safetensors files found")
        self.location: dict[str, Path] = {}
        for path in files:
            if not path.is_file():
                raise MinitronError(f"{index}: lists {path.name}, which does not exist")
            for name in _check_complete(path):
                self.location[name] = path
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.location)

    def get(self, name: str) -> torch.Tensor:
        path = self.location[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(name)  # type: ignore[attr-defined]

    def dtype(self) -> torch.dtype:
        first = next(iter(self.location))
        return self.get(first).dtype


class ShardedSafetensorsWriter:
    """Collect tensors and write `model-0000i-of-0000n.safetensors` shards of at most max_bytes."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self._files):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names, write the index if sharded."""
        if self._pending:
            self._flush()
        n = len(self._files)
        if n == 1:
            final = self.out_dir / "model.safetensors"
            self._files[0][0].rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        finals = []
        for i, (path, names) in enumerate(self._files):
            final = self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return finals
