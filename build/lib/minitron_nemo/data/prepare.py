"""`minitron data prepare`: text -> megatron indexed dataset, streamed, in N tokenizer workers.

    readers (one document at a time) -> batches of ~1 MB of text -> N worker processes
    (tokenizer, EOD appended) -> results in input order -> IndexedWriter (bounded memory)

At most 2 x N batches are in flight, so memory stays bounded whatever the input size, and the
output does not depend on N (documents are tokenised independently and written in order).
A progress bar shows MB/s of input, documents/s and tokens/s. PREFIX.json records the inputs,
the tokenizer and the counts.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy

from minitron_nemo.data.indexed import IndexedWriter, token_dtype
from minitron_nemo.data.readers import ReadStats, expand_inputs, input_bytes, read_documents
from minitron_nemo.errors import MinitronError
from minitron_nemo.runtime.progress import Progress

BATCH_BYTES = 1 << 20

_worker_tokenizer = None  # set in each worker process by _init_worker


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise MinitronError(f"{path}: tokenizer directory not found")
    return AutoTokenizer.from_pretrained(str(path))


def end_of_document_id(tokenizer, where: str) -> int:
    if tokenizer.eos_token_id is None:
        raise MinitronError(f"{where}: the tokenizer has no EOS token to end documents with")
    return int(tokenizer.eos_token_id)


def encode(tokenizer, docs: list[str], eod: int, dtype) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Token ids of each document + EOD, as one flat array and the per-document lengths."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    lengths = numpy.fromiter((len(x) + 1 for x in ids), dtype=numpy.int64, count=len(ids))
    flat = numpy.empty(int(lengths.sum()), dtype=dtype)
    ends = numpy.cumsum(lengths)
    for doc, end, length in zip(ids, ends, lengths, strict=True):
        flat[end - length : end - 1] = doc
        flat[end - 1] = eod
    return flat, lengths


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode_in_worker(docs: list[str], eod: int, dtype) -> tuple[numpy.ndarray, numpy.ndarray]:
    return encode(_worker_tokenizer, docs, eod, dtype)


def _batches(docs: Iterator[str], batch_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prepare(
    inputs: list[str],
    tokenizer_dir: Path,
    out_prefix: Path | str,
    json_key: str = "text",
    workers: int = 1,
    skip_bad_lines: bool = False,
    batch_bytes: int = BATCH_BYTES,
    progress: bool = True,
    record: dict | None = None,
) -> dict:
    """Tokenise every document of `inputs` into OUT_PREFIX.bin / .idx (see module docstring);
    `record` is added to the summary written to OUT_PREFIX.json."""
    if workers < 1:
        raise MinitronError(f"--workers: expected >= 1, got {workers}")
    paths = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_dir)
    eod = end_of_document_id(tokenizer, str(tokenizer_dir))
    dtype = token_dtype(len(tokenizer))
    stats = ReadStats()
    batches = _batches(read_documents(paths, json_key, skip_bad_lines, stats), batch_bytes)
    writer = IndexedWriter(out_prefix, dtype)
    bar = Progress(input_bytes(paths), "prepare", unit="B", enabled=progress)
    start = time.time()
    shown = 0

    def write(result: tuple[numpy.ndarray, numpy.ndarray]) -> None:
        nonlocal shown
        writer.add_documents(*result)
        elapsed = max(time.time() - start, 1e-9)
        bar.update(
            stats.bytes - shown, docs_s=writer.documents / elapsed, tok_s=writer.tokens / elapsed
        )
        shown = stats.bytes

    try:
        if workers == 1:
            for batch in batches:
                write(encode(tokenizer, batch, eod, dtype))
        else:
            _run_pool(batches, workers, str(tokenizer_dir), eod, dtype, write)
        if writer.documents == 0:
            raise MinitronError(f"{', '.join(inputs)}: no documents found (empty input)")
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    summary = {
        "inputs": [str(p) for p in paths],
        "tokenizer": str(tokenizer_dir),
        "vocab_size": len(tokenizer),
        "eod": eod,
        "dtype": numpy.dtype(dtype).name,
        "documents": writer.documents,
        "tokens": writer.tokens,
        "input_bytes": stats.bytes,
        "skipped_lines": stats.skipped_count,
        "skipped_examples": stats.skipped,
        "workers": workers,
        "seconds": time.time() - start,
        **(record or {}),
    }
    tmp = Path(f"{out_prefix}.json.incomplete")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, f"{out_prefix}.json")
    return summary


def _run_pool(batches, workers: int, tokenizer_dir: str, eod: int, dtype, write) -> None:
    """Tokenise batches in `workers` processes, at most 2 x workers in flight, in order."""
    pending: collections.deque[Future] = collections.deque()
    with ProcessPoolExecutor(
        workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(tokenizer_dir,),
    ) as pool:
        try:
            for batch in batches:
                pending.append(pool.submit(_encode_in_worker, batch, eod, dtype))
                if len(pending) >= 2 * workers:
                    write(pending.popleft().result())
            while pending:
                write(pending.popleft().result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
