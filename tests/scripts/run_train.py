"""Run `distill.train.train` from a JSON spec in a fresh process (kill / resume / signal tests).

usage: run_train.py SPEC.json   (exit code 0 also when stopped by a signal after saving)
"""

import json
import sys
from pathlib import Path


def main() -> int:
    from minitron_nemo.config import DistillConfig
    from minitron_nemo.data.datasets import DataSpec
    from minitron_nemo.distill.train import train
    from minitron_nemo.errors import Stopped
    from tests.fault_hooks import hooks_from_spec

    spec = json.loads(Path(sys.argv[1]).read_text())
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["data"].items()}
    try:
        train(
            Path(spec["student"]),
            Path(spec["out"]),
            DistillConfig(**spec["cfg"]),
            DataSpec(**data),
            Path(spec["teacher"]) if spec.get("teacher") else None,
            tp=spec.get("tp", 1),
            pp=spec.get("pp", 1),
            dp=spec.get("dp", 1),
            ep=spec.get("ep", 1),
            resume=spec.get("resume", True),
            hooks=hooks_from_spec(spec),
        )
    except Stopped as exc:
        print(exc, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
