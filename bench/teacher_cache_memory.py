"""A rank's memory while it reads a teacher cache end to end, at two cache sizes: the rows read
with pread (TeacherCache, what the trainer does) vs the same rows through np.memmap (the
alternative). Each measurement runs in a fresh process; "rss" is its peak (VmHWM) minus its
peak before reading. Synthetic cache: K = 64, bf16 values, uint16 ids, seq 1024 (262 KB per
sample), micro-batches of 4 samples.

usage: .venv/bin/python bench/teacher_cache_memory.py [--work /tmp/bench_cache_mem]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

SEQ, K, MB = 1024, 64, 4

READ = """
import sys, time, numpy as np
from pathlib import Path
from minitron_nemo.distill.teacher_cache import TeacherCache

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

cache = TeacherCache(Path(sys.argv[1]))
n = cache.meta.samples
before, start = hwm(), time.perf_counter()
if sys.argv[2] == "pread":
    for i in range(0, n, 4):
        cache.read(list(range(i, min(i + 4, n))))
else:
    arrays = {name: np.memmap(cache.path / f"{name}.bin", dtype=dt, mode="r", shape=shape)
              for name, (shape, dt) in cache.meta.shapes().items()}
    for i in range(0, n, 4):
        rows = [np.array(a[i:i + 4]) for a in arrays.values()]
print(hwm() - before, time.perf_counter() - start)
"""


def make_cache(path: Path, samples: int) -> float:
    import numpy as np

    from minitron_nemo import atomic
    from minitron_nemo.distill.teacher_cache import CacheMeta

    meta = CacheMeta(K, 1.0, "bfloat16", samples, SEQ, 49152, "x", {}, "synthetic")
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (shape, dt) in meta.shapes().items():
        with open(path / f"{name}.bin", "wb") as fh:  # written in slices of 64 samples
            for i in range(0, shape[0], 64):
                block = (min(64, shape[0] - i), *shape[1:])
                fh.write(rng.integers(0, 1000, size=block).astype(dt).tobytes())
    atomic.write_json(path / "meta.json", asdict(meta))
    (path / atomic.DONE).write_text("")
    return meta.total_bytes() / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_cache_mem"))
    args = parser.parse_args()
    rows = []
    for samples in (760, 7600):
        path = args.work / f"cache_{samples}"
        start = time.perf_counter()
        mb = make_cache(path, samples)
        made = time.perf_counter() - start
        for how in ("pread", "memmap"):
            out = subprocess.run([sys.executable, "-c", READ, str(path), how],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            rss, seconds = map(float, out.stdout.split())
            rows.append({"cache_mb": mb, "how": how, "rss_mb": rss, "read_s": seconds,
                         "write_s": made})  # fmt: skip
    print(json.dumps(rows, indent=2))
    print("| cache MB | reader | rank memory growth MB | read s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache_mb']:.0f} | {r['how']} | {r['rss_mb']:.1f} | {r['read_s']:.1f} |")


if __name__ == "__main__":
    main()
