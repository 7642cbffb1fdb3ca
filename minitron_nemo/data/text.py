"""Text sources -> fixed-length token samples (calibration, distillation, held-out).

A source is a path to a .txt (documents separated by blank lines or one per line) or .jsonl
(a "text" field per line) file, a built-in offline corpus `gensim:<name>`, or the PREFIX of a
megatron indexed dataset (PREFIX.bin / PREFIX.idx, see `minitron data prepare`). Documents are
tokenised, joined with EOS and cut into samples of `seq_length + 1` tokens (inputs + the next
token). Splits are made on whole samples, so calibration, distillation and held-out never share
a token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minitron_nemo.errors import MinitronError


def read_documents(source: str) -> list[str]:
    """Documents of a source (see module docstring)."""
    if source.startswith("gensim:"):
        from minitron_nemo.data.sources import gensim_text

        text = gensim_text(source.split(":", 1)[1])
        return [line for line in text.splitlines() if line.strip()]
    path = Path(source)
    if not path.is_file():
        raise MinitronError(
            f"{source}: data file not found (expected .txt, .jsonl, gensim:NAME or the prefix "
            "of a megatron indexed dataset)"
        )
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MinitronError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise MinitronError(f'{path}:{lineno}: expected an object with a "text" string')
            docs.append(record["text"])
        return docs
    text = path.read_text(errors="replace")
    parts = [p for p in text.split("\n\n") if p.strip()]
    return parts if len(parts) > 1 else [line for line in text.splitlines() if line.strip()]


def token_stream(source: str, tokenizer) -> torch.Tensor:
    """Tokens of a source: a megatron indexed dataset prefix is read as is, text is tokenised."""
    from minitron_nemo.data.indexed import is_indexed_prefix, read_indexed_stream

    if is_indexed_prefix(source):
        return read_indexed_stream(source)
    return tokenize_stream(read_documents(source), tokenizer)


def tokenize_stream(docs: list[str], tokenizer) -> torch.Tensor:
    """All documents as one 1-D token stream, each followed by EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Splits:
    """Disjoint [n, seq_length + 1] sample tensors."""

    calibration: torch.Tensor
    distill: torch.Tensor
    heldout: torch.Tensor


def make_samples(stream: torch.Tensor, seq_length: int) -> torch.Tensor:
    n = stream.numel() // (seq_length + 1)
    if n == 0:
        raise MinitronError(
            f"data: {stream.numel()} tokens are fewer than one sample of {seq_length + 1}"
        )
    return stream[: n * (seq_length + 1)].view(n, seq_length + 1)


def split_samples(
    samples: torch.Tensor, heldout: int, calibration: int, distill: int | None = None, seed: int = 0
) -> Splits:
    """Shuffle samples (fixed seed) and cut them into disjoint held-out / calibration / distill
    sets; distill takes all that is left when None."""
    n = samples.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    need = heldout + calibration + (distill or 0)
    if need > n or heldout + calibration >= n:
        raise MinitronError(
            f"data: {n} samples cannot give {heldout} held-out + {calibration} calibration"
            + (f" + {distill} distillation" if distill else " + a distillation set")
        )
    held = samples[order[:heldout]]
    calib = samples[order[heldout : heldout + calibration]]
    rest = order[heldout + calibration :]
    dist = samples[rest if distill is None else rest[:distill]]
    return Splits(calibration=calib, distill=dist, heldout=held)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def source_splits(
    source: str,
    tokenizer_dir: Path,
    seq_length: int,
    heldout: int,
    calibration: int,
    distill: int | None = None,
    seed: int = 0,
) -> Splits:
    """Tokenise a source with the tokenizer in `tokenizer_dir` and split it (see above)."""
    stream = token_stream(source, load_tokenizer(tokenizer_dir))
    return split_samples(make_samples(stream, seq_length), heldout, calibration, distill, seed)
