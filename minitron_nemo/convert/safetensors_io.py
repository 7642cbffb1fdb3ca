"""Read HF safetensors lazily (tensor by tensor) and write sharded safetensors atomically."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

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


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}


class StreamingSafetensorsWriter:
    """Writes tensors straight to `model-0000i-of-0000n.safetensors` shards, one at a time.

    The caller declares every tensor (name, shape, dtype) in writing order first, so the shard
    layout and each shard's header are known before any data: each `add` then writes one
    tensor's bytes at its place, and memory holds one tensor, not a shard (the safetensors
    library's `save_file` needs the whole shard in memory). Files are named `.tmp` until
    `close`; the caller's atomic directory makes the whole output appear at once.
    """

    def __init__(
        self,
        out_dir: Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int,
    ) -> None:
        self.out_dir = out_dir
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        self.order = [entry for shard in self.shards for entry in shard]
        self.shard_of = {e[0]: i for i, shard in enumerate(self.shards) for e in shard}
        self.total_bytes = sum(e[3] for e in self.order)
        self._next = 0
        self._shard = -1
        self._file = None

    def _path(self, i: int) -> Path:
        return self.out_dir / f"shard-{i:05d}.tmp"

    def _open(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[i]:
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as save_file does
        self._file = self._path(i).open("wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._shard = i

    def add(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape, dtype, _nbytes = self.order[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (expected, shape, dtype):
            raise RuntimeError(
                f"safetensors writer: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                f"declared {expected} {shape} {dtype}"
            )
        shard = self.shard_of[name]
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():  # through the buffer protocol: no bytes copy of the tensor
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> list[Path]:
        """Give the shards their final names and write the index if there are several."""
        if self._next != len(self.order):
            raise RuntimeError(
                f"safetensors writer: {len(self.order) - self._next} tensors missing"
            )
        if self._file is not None:
            self._file.close()
        n = len(self.shards)
        if n == 1:
            final = self.out_dir / "model.safetensors"
            self._path(0).rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        finals = []
        for i, shard in enumerate(self.shards):
            final = self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._path(i).rename(final)
            finals.append(final)
            weight_map.update({name: final.name for name, *_ in shard})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return finals
