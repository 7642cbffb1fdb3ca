"""Run `distill.train.train` from a JSON spec in a fresh process (for kill / resume tests).

usage: run_train.py SPEC.json
"""

import json
import sys
from pathlib import Path


def main() -> None:
    from minitron_nemo.config import DistillConfig
    from minitron_nemo.data.datasets import DataSpec
    from minitron_nemo.distill.train import train

    spec = json.loads(Path(sys.argv[1]).read_text())
    train(
        Path(spec["student"]),
        Path(spec["out"]),
        DistillConfig(**spec["cfg"]),
        DataSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["data"].items()}),
        Path(spec["teacher"]) if spec.get("teacher") else None,
        tp=spec.get("tp", 1),
        pp=spec.get("pp", 1),
        dp=spec.get("dp", 1),
        resume=spec.get("resume", True),
    )


if __name__ == "__main__":
    main()
