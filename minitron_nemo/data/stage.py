"""The data stage: the recipe's `data:` section -> indexed datasets + megatron indices + data.json.

- Text sources (`data.source`, or text entries of `data.blend`) are prepared into
  `OUT/<name>.bin/.idx` with the teacher's tokenizer (`minitron data prepare`'s code path); a
  prepared dataset whose PREFIX.json records the same inputs and tokenizer is reused, so a rerun
  does not tokenise again.
- Every dataset is opened and checked (both files, .bin length, token ids < the vocabulary).
- megatron's calibration and test indices are built into the cache once, before any rank
  starts (each training stage builds the train index for its own length the same way).
- `data.json` records the datasets (paths relative to the run directory where they are inside
  it), the split and the sample counts; `load_spec` turns it into the `DataSpec` ranks get.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from minitron_nemo.config import DataConfig
from minitron_nemo.data.datasets import DataSpec, build_indices
from minitron_nemo.data.indexed import check_vocabulary, is_indexed_prefix, open_indexed
from minitron_nemo.data.spec import parse_blend

log = logging.getLogger(__name__)


def entries(cfg: DataConfig) -> list[tuple[float, str]]:
    """(weight, source) of every dataset of the recipe: the blend, or the single source."""
    return parse_blend(cfg.blend) if cfg.blend else [(1.0, cfg.source)]


def _name(source: str, i: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.split(":")[-1]).name.split(".")[0])
    return f"{i:02d}_{stem or 'text'}_text_document"


def _prepared(prefix: Path, source: str, tokenizer_dir: Path) -> bool:
    meta = Path(f"{prefix}.json")
    if not (meta.is_file() and Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file()):
        return False
    recorded = json.loads(meta.read_text())
    return recorded.get("source") == source and recorded.get("tokenizer") == str(tokenizer_dir)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def run_data_stage(
    cfg: DataConfig,
    tokenizer_dir: Path,
    out: Path,
    run_dir: Path,
    vocab_size: int,
) -> dict:
    """Prepare / check every dataset, build megatron's calibration and test indices, write and
    return data.json (each training stage builds its own train index)."""
    from minitron_nemo.data.prepare import end_of_document_id, load_tokenizer, prepare

    out.mkdir(parents=True, exist_ok=True)
    eod = end_of_document_id(load_tokenizer(tokenizer_dir), str(tokenizer_dir))
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    datasets = []
    for i, (weight, source) in enumerate(entries(cfg)):
        if is_indexed_prefix(source):
            prefix, stats = Path(source), None
        else:
            prefix = out / _name(source, i)
            if not _prepared(prefix, source, tokenizer_dir):
                log.info("data: preparing %s -> %s", source, prefix)
                prepare(
                    [source],
                    tokenizer_dir,
                    prefix,
                    cfg.json_key,
                    cfg.prepare_workers,
                    record={"source": source},
                )
            stats = json.loads(Path(f"{prefix}.json").read_text())
        dataset = open_indexed(str(prefix))
        check_vocabulary(str(prefix), vocab_size, cache_dir)
        datasets.append(
            {
                "prefix": _relative(prefix, run_dir),
                "weight": weight,
                "source": source,
                "documents": len(dataset),
                "tokens": int(dataset.index.sequence_lengths.sum(dtype="int64")),
                "prepared": stats is not None,
            }
        )
    record = {
        "datasets": datasets,
        "split": cfg.split,
        "seq_length": cfg.seq_length,
        "seed": cfg.seed,
        "cache_dir": _relative(cache_dir, run_dir),
        "vocab_size": vocab_size,
        "eod": eod,
        "heldout_samples": cfg.heldout_samples,
        "calibration_samples": cfg.calibration_samples,
    }
    record["view_samples"] = build_indices(load_spec(record, run_dir), ("calibration", "test"))
    (out / "data.json").write_text(json.dumps(record, indent=2))
    return record


def load_spec(record: dict, run_dir: Path) -> DataSpec:
    """The DataSpec of a data.json record (relative paths resolved against `run_dir`)."""

    def resolve(path: str) -> str:
        p = Path(path)
        return str(p if p.is_absolute() else (run_dir / p).resolve())

    return DataSpec(
        prefixes=tuple(resolve(d["prefix"]) for d in record["datasets"]),
        weights=tuple(float(d["weight"]) for d in record["datasets"]),
        split=record["split"],
        seq_length=int(record["seq_length"]),
        seed=int(record["seed"]),
        cache_dir=resolve(record["cache_dir"]),
        vocab_size=int(record["vocab_size"]),
        eod=int(record["eod"]),
        heldout_samples=int(record["heldout_samples"]),
        calibration_samples=int(record["calibration_samples"]),
    )


def prepare_data(cfg: DataConfig, tokenizer_dir: Path, out: Path, vocab_size: int) -> DataSpec:
    """The data stage outside a run (benchmarks, studies): `out` holds everything."""
    return load_spec(run_data_stage(cfg, tokenizer_dir, out, out, vocab_size), out)
