"""`minitron data prepare` throughput and memory: 1 vs 2 tokenizer workers, 50 MB vs 500 MB.

The input is JSON lines built from the offline corpora in gensim's wheel (Wikipedia sample and
Lee news, repeated with a counter so no two lines are equal), tokenised with SmolLM2's
tokenizer. Each run is a fresh process; peak RSS is reported for the main process (reader +
writer) and for the largest worker.

usage: .venv/bin/python bench/prepare_throughput.py [--sizes-mb 50 500] [--dir /tmp/minitron_prep]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def build_jsonl(path: Path, megabytes: float) -> int:
    from minitron_nemo.data.sources import gensim_text

    lines = [
        line
        for name in ("wiki_head500", "lee_background", "lee")
        for line in gensim_text(name).splitlines()
        if line.strip()
    ]
    target, written, rep = megabytes * 1e6, 0, 0
    with path.open("w") as fh:
        while written < target:
            for line in lines:
                record = json.dumps({"text": f"[{rep}] {line}"}) + "\n"
                fh.write(record)
                written += len(record)
            rep += 1
    return written


def role_prepare(jsonl: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    from minitron_nemo.data.prepare import prepare

    stats = prepare([str(jsonl)], tokenizer, out, workers=workers, progress=False)
    return {
        "workers": workers,
        "input_mb": stats["input_bytes"] / 1e6,
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "seconds": stats["seconds"],
        "tokens_per_s": stats["tokens"] / stats["seconds"],
        "mb_per_s": stats["input_bytes"] / 1e6 / stats["seconds"],
        "main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", nargs="+", type=float, default=[50, 500])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/minitron_prep"))
    parser.add_argument("--role", action="store_true")
    parser.add_argument("--jsonl", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--n", type=int, default=1)
    args = parser.parse_args()
    from minitron_nemo.data.sources import smollm2_hf_dir

    tokenizer = smollm2_hf_dir()
    if args.role:
        print(json.dumps(role_prepare(args.jsonl, tokenizer, args.out, args.n)))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes_mb:
        jsonl = args.dir / f"input_{int(size)}mb.jsonl"
        if not jsonl.is_file():
            build_jsonl(jsonl, size)
        # Throughput for every worker count on the smallest input; memory at every size with
        # the largest worker count.
        counts = args.workers if size == min(args.sizes_mb) else [max(args.workers)]
        for workers in counts:
            cmd = [sys.executable, __file__, "--role", "--jsonl", str(jsonl), "--n", str(workers)]
            cmd += ["--out", str(args.dir / f"out_{int(size)}_{workers}")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(
        "\n| input MB | workers | documents | tokens | s | tokens/s | MB/s | main RSS MB "
        "| worker RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['input_mb']:.0f} | {r['workers']} | {r['documents']:,} | {r['tokens']:,} | "
            f"{r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {r['mb_per_s']:.2f} | "
            f"{r['main_peak_rss_mb']:.0f} | "
            + (f"{r['worker_peak_rss_mb']:.0f} |" if r["workers"] > 1 else "- |")
        )


if __name__ == "__main__":
    main()
