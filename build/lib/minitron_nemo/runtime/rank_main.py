"""Entry point of one rank started by torchrun for `run_on_ranks` (multi-node launches).

usage (written by runtime.launch, not by hand):
    torchrun ... -m minitron_nemo.runtime.rank_main JOB.pkl
JOB.pkl holds (function, args); the function is importable (pickled by reference).
"""

from __future__ import annotations

import pickle
import sys


def main() -> None:
    with open(sys.argv[1], "rb") as fh:
        fn, args = pickle.load(fh)
    fn(*args)


if __name__ == "__main__":
    main()
