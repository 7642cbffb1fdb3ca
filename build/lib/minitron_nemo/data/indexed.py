"""Megatron indexed datasets (PREFIX.bin + PREFIX.idx): a streaming writer and a checked opener.

The files are megatron-core's format (read by its `IndexedDataset`, `GPTDataset` and blends of
them): one sequence per document, EOD appended by the caller. megatron's own
`IndexedDatasetBuilder` keeps a Python list of every document's length and writes the index at
the end, so its memory grows with the number of documents (~100 bytes per document; a 94B-token
corpus of ~100M documents needs ~10 GB). `IndexedWriter` writes the same bytes with memory bounded
by one chunk: lengths are streamed to a side file and the index is assembled from it in chunks.
The header constants come from megatron-core, and tests read every file back with its reader.

Writes are atomic: everything is written under `*.incomplete` names, then the old .idx (if any)
is removed, the .bin renamed, and the .idx renamed last. A prefix with both files is complete.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy

from minitron_nemo.errors import MinitronError

CHUNK = 1 << 22  # elements per chunk when assembling the index / scanning tokens


def token_dtype(vocab_size: int) -> type[numpy.number]:
    """The smallest token dtype megatron uses for this vocabulary (uint16 below 65500)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def is_indexed_prefix(path: str) -> bool:
    return Path(path + ".idx").is_file() or Path(path + ".bin").is_file()


class IndexedWriter:
    """Append documents (1-D integer arrays) and finalize into PREFIX.bin / PREFIX.idx."""

    def __init__(self, prefix: str | Path, dtype: type[numpy.number]) -> None:
        self.prefix = str(prefix)
        self.dtype = numpy.dtype(dtype)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = f"{self.prefix}.bin.incomplete"
        self._len_tmp = f"{self.prefix}.lengths.incomplete"
        self._idx_tmp = f"{self.prefix}.idx.incomplete"
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in finalize / abort
        self._lengths = open(self._len_tmp, "wb")  # noqa: SIM115
        self.documents = 0
        self.tokens = 0

    def add_documents(self, tokens: numpy.ndarray, lengths: numpy.ndarray) -> None:
        """Append documents given as one flat token array and the length of each document."""
        if int(lengths.sum()) != tokens.size:
            raise ValueError("lengths do not add up to the number of tokens")
        self._bin.write(numpy.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.write(numpy.ascontiguousarray(lengths, dtype=numpy.int32).tobytes())
        self.documents += int(lengths.size)
        self.tokens += int(tokens.size)

    def finalize(self) -> None:
        """Write the index from the streamed lengths and rename both files into place."""
        from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

        self._bin.close()
        self._lengths.close()
        n = self.documents
        itemsize = self.dtype.itemsize
        lengths = numpy.memmap(self._len_tmp, dtype=numpy.int32, mode="r") if n else None
        with open(self._idx_tmp, "wb") as idx:
            idx.write(_INDEX_HEADER)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", DType.code_from_dtype(self.dtype.type)))
            idx.write(struct.pack("<Q", n))  # sequences
            idx.write(struct.pack("<Q", n + 1))  # document boundaries: 0, 1, ..., n
            for start in range(0, n, CHUNK):
                idx.write(numpy.asarray(lengths[start : start + CHUNK]).tobytes())
            offset = numpy.int64(0)
            for start in range(0, n, CHUNK):
                chunk = numpy.asarray(lengths[start : start + CHUNK], dtype=numpy.int64)
                pointers = numpy.cumsum(chunk) - chunk
                idx.write((pointers * itemsize + offset).tobytes())
                offset += chunk.sum() * itemsize
            for start in range(0, n + 1, CHUNK):
                idx.write(
                    numpy.arange(start, min(start + CHUNK, n + 1), dtype=numpy.int64).tobytes()
                )
        del lengths
        os.unlink(self._len_tmp)
        Path(f"{self.prefix}.idx").unlink(missing_ok=True)  # never pair an old .idx with a new .bin
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(self._idx_tmp, f"{self.prefix}.idx")

    def abort(self) -> None:
        """Close and remove the partial files (nothing that looks complete is left)."""
        for fh in (self._bin, self._lengths):
            fh.close()
        for path in (self._bin_tmp, self._len_tmp, self._idx_tmp):
            Path(path).unlink(missing_ok=True)


def open_indexed(prefix: str):
    """megatron's `IndexedDataset` for PREFIX, after checking that both files exist and that
    the .bin holds every token the .idx describes (one line naming the file otherwise)."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise MinitronError(
                f"{path}: not found (an indexed dataset is PREFIX.bin + PREFIX.idx; make one with "
                "`minitron data prepare`)"
            )
    with idx_path.open("rb") as fh:
        if fh.read(len(_INDEX_HEADER)) != _INDEX_HEADER:
            raise MinitronError(f"{idx_path}: not a megatron indexed-dataset index (bad header)")
        fh.seek(len(_INDEX_HEADER) + 8 + 1)  # version, dtype code
        (sequences,) = struct.unpack("<Q", fh.read(8))
    if sequences == 0 or bin_path.stat().st_size == 0:
        raise MinitronError(f"{prefix}: the dataset is empty (no documents with tokens)")
    try:
        dataset = IndexedDataset(prefix)
    except (AssertionError, ValueError) as exc:
        raise MinitronError(f"{idx_path}: unreadable index ({exc})") from None
    index = dataset.index
    if len(index) == 0 or int(index.sequence_lengths.max(initial=0)) == 0:
        raise MinitronError(f"{prefix}: the dataset is empty (no documents with tokens)")
    needed = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    have = bin_path.stat().st_size
    if have < needed:
        raise MinitronError(
            f"{bin_path}: {have} bytes, but {idx_path.name} describes {needed} bytes "
            "(truncated copy?)"
        )
    return dataset


def max_token_id(prefix: str, cache_dir: Path | None = None) -> int:
    """Largest token id in PREFIX.bin, scanned in chunks (memory: one chunk) and remembered in
    `cache_dir` keyed on the file's path, size and modification time."""
    bin_path = Path(prefix + ".bin").resolve()
    stat = bin_path.stat()
    key = f"{bin_path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = cache_dir / "token_stats.json" if cache_dir is not None else None
    known = json.loads(memo.read_text()) if memo is not None and memo.is_file() else {}
    if key in known:
        return int(known[key])
    dataset = open_indexed(prefix)
    tokens = numpy.memmap(bin_path, dtype=dataset.index.dtype, mode="r")
    largest = 0
    for start in range(0, tokens.size, CHUNK * 16):
        largest = max(largest, int(tokens[start : start + CHUNK * 16].max()))
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        known[key] = largest
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, memo)
    return largest


def check_vocabulary(prefix: str, vocab_size: int, cache_dir: Path | None = None) -> None:
    """Refuse a dataset holding a token id the model cannot embed."""
    largest = max_token_id(prefix, cache_dir)
    if largest >= vocab_size:
        raise MinitronError(
            f"{prefix}.bin: token id {largest} >= the model's vocabulary size {vocab_size} "
            "(prepared with another tokenizer?)"
        )
