"""Text / jsonl -> megatron indexed dataset (PREFIX.bin + PREFIX.idx) and back to tokens.

The files are written by megatron-core's own `IndexedDatasetBuilder` (one document per item,
EOS appended), so megatron's `IndexedDataset` / `GPTDataset` (and blends of them) read them.
Both files are built under temporary names and renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy
import torch

from minitron_nemo.data.text import load_tokenizer, read_documents
from minitron_nemo.errors import MinitronError
from minitron_nemo.runtime.progress import Progress


def is_indexed_prefix(source: str) -> bool:
    return Path(source + ".idx").is_file() and Path(source + ".bin").is_file()


def prepare_indexed(source: str, tokenizer_dir: Path, out_prefix: Path) -> dict:
    """Tokenise every document of `source` and write PREFIX.bin / PREFIX.idx."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokenizer = load_tokenizer(tokenizer_dir)
    docs = read_documents(source)
    dtype = numpy.uint16 if len(tokenizer) < 65500 else numpy.int32
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_tmp, idx_tmp = (Path(f"{out_prefix}.{ext}.incomplete") for ext in ("bin", "idx"))
    builder = IndexedDatasetBuilder(str(bin_tmp), dtype=dtype)
    tokens = 0
    bar = Progress(len(docs), "tokenising", unit="doc")
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        builder.add_item(torch.tensor(ids, dtype=torch.long))
        builder.end_document()
        tokens += len(ids)
        bar.update(1)
    bar.close()
    builder.finalize(str(idx_tmp))
    os.replace(bin_tmp, f"{out_prefix}.bin")
    os.replace(idx_tmp, f"{out_prefix}.idx")
    return {"documents": len(docs), "tokens": tokens, "dtype": numpy.dtype(dtype).name}


def read_indexed_stream(prefix: str) -> torch.Tensor:
    """All documents of a megatron indexed dataset as one token stream."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not is_indexed_prefix(prefix):
        raise MinitronError(f"{prefix}: expected {prefix}.bin and {prefix}.idx")
    dataset = IndexedDataset(prefix)
    return torch.from_numpy(
        numpy.concatenate([dataset[i] for i in range(len(dataset))]).astype(numpy.int64)
    )
