"""Data at the 8B recipe's shape: index build, one rank's step fetch, rank memory vs data size.

For each dataset size (default 20M and 2B tokens) a synthetic indexed dataset (uint16, documents
of log-normal length, mean ~1.8k tokens) is written with the streaming writer, then, each in a
fresh process so peak RSS is its own:
- data stage: megatron's train / test indices for the recipe's 10,000 steps x 1152 samples of
  8192 tokens (11.5M samples, 94B tokens: many epochs of the small dataset) are built into the
  cache (first build), then built again (a no-op once published);
- rank: one data-parallel rank of 16 loads the cached indices and reads its 72 samples of
  8193 tokens for a few steps spread over the run (memory-mapped .bin and indices).

usage: .venv/bin/python bench/data_scale.py [--tokens 2e7 2e9] [--dir /tmp/minitron_data_scale]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SEQ, GBS, STEPS, DP = 8192, 1152, 10_000, 16
VOCAB = 128_256  # Llama-3 vocabulary: int32 tokens would be needed; uint16 keeps 2B = 4 GB
BENCH_VOCAB = 65_000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_dataset(prefix: Path, tokens: int, seed: int = 0) -> dict:
    import numpy

    from minitron_nemo.data.indexed import IndexedWriter

    rng = numpy.random.default_rng(seed)
    writer = IndexedWriter(prefix, numpy.uint16)
    start = time.time()
    while writer.tokens < tokens:
        lengths = numpy.clip(rng.lognormal(7.0, 1.0, 20_000), 16, 32_768).astype(numpy.int64)
        lengths = (
            lengths[numpy.cumsum(lengths) <= tokens - writer.tokens] if writer.tokens else lengths
        )
        if lengths.size == 0:
            break
        data = rng.integers(1, BENCH_VOCAB, int(lengths.sum()), dtype=numpy.uint16)
        writer.add_documents(data, lengths)
    writer.finalize()
    return {"documents": writer.documents, "tokens": writer.tokens, "seconds": time.time() - start}


def spec_for(prefix: Path, cache: Path):
    from minitron_nemo.data.datasets import DataSpec

    return DataSpec(
        prefixes=(str(prefix),),
        weights=(1.0,),
        split="99,0.5,0.5",
        seq_length=SEQ,
        seed=0,
        cache_dir=str(cache),
        vocab_size=BENCH_VOCAB,
        eod=0,
        train_samples=STEPS * GBS,
        heldout_samples=8,  # 0.5% of 20M tokens holds ~12 samples of 8193 tokens
        calibration_samples=1024,
    )


def role_data_stage(prefix: Path, cache: Path) -> dict:
    from minitron_nemo.data.datasets import build_indices

    spec = spec_for(prefix, cache)
    start = time.time()
    views = ("train", "calibration", "test")
    counts = build_indices(spec, views)
    first = time.time() - start
    start = time.time()
    build_indices(spec, views)
    return {
        "index_build_s": first,
        "index_rebuild_s": time.time() - start,
        "samples": counts,
        "peak_rss_mb": peak_rss_mb(),
    }


def role_rank(prefix: Path, cache: Path) -> dict:
    import megatron.core  # noqa: F401 - count the import in the baseline like a real rank

    from minitron_nemo.data.datasets import step_microbatches, train_reader

    baseline = peak_rss_mb()
    spec = spec_for(prefix, cache)
    start = time.time()
    reader = train_reader(spec)
    load = time.time() - start
    fetch = []
    for step in (0, 1, 2500, 5000, 9999):
        start = time.time()
        batches = step_microbatches(reader, step * GBS, GBS, 1, dp_rank=7, dp_size=DP)
        fetch.append(time.time() - start)
        assert len(batches) == GBS // DP and batches[0].shape == (1, SEQ + 1)
    return {
        "load_cached_indices_s": load,
        "step_fetch_s": fetch,
        "samples_per_step": GBS // DP,
        "rss_before_data_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_role(role: str, prefix: Path, cache: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--role", role, "--prefix", str(prefix), "--cache", str(cache)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", nargs="+", type=float, default=[2e7, 2e9])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/minitron_data_scale"))
    parser.add_argument("--role", choices=["data", "rank"])
    parser.add_argument("--prefix", type=Path)
    parser.add_argument("--cache", type=Path)
    args = parser.parse_args()
    if args.role == "data":
        print(json.dumps(role_data_stage(args.prefix, args.cache)))
        return
    if args.role == "rank":
        print(json.dumps(role_rank(args.prefix, args.cache)))
        return
    rows = []
    for tokens in args.tokens:
        root = args.dir / f"{int(tokens):d}"
        prefix = root / "synthetic_text_document"
        if not Path(f"{prefix}.idx").is_file():
            written = write_dataset(prefix, int(tokens))
            print(f"wrote {written}", flush=True)
        row = {"tokens": int(tokens), "bin_gb": Path(f"{prefix}.bin").stat().st_size / 1e9}
        shutil.rmtree(root / "cache", ignore_errors=True)  # time a first build
        row["data_stage"] = run_role("data", prefix, root / "cache")
        row["rank"] = run_role("rank", prefix, root / "cache")
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(
        "\n| dataset tokens | .bin GB | index build (first) s | index build (again) s "
        "| data-stage peak RSS MB | rank: load cached s | rank: fetch 72 x 8193 tokens s "
        "(first / max of the next 4) | rank peak RSS MB (before data) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, k = r["data_stage"], r["rank"]
        print(
            f"| {r['tokens']:,} | {r['bin_gb']:.2f} | {d['index_build_s']:.1f} | "
            f"{d['index_rebuild_s']:.3f} | {d['peak_rss_mb']:.0f} | "
            f"{k['load_cached_indices_s']:.2f} | {k['step_fetch_s'][0]:.3f} / "
            f"{max(k['step_fetch_s'][1:]):.3f} | "
            f"{k['peak_rss_mb']:.0f} ({k['rss_before_data_mb']:.0f}) |"
        )


if __name__ == "__main__":
    main()
