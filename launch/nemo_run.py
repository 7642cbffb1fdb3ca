"""Launch a recipe with NeMo-Run (optional extra: pip install -e .[launch]).

usage:
  python launch/nemo_run.py RECIPE [key=value ...] [--executor local|slurm] [--gpus 8]
      [--account ACCOUNT --partition PARTITION --container IMAGE]

The script only builds the command line `minitron run RECIPE overrides` and hands it to a
NeMo-Run executor (local or Slurm with a container); minitron starts its own ranks.
"""

from __future__ import annotations

import argparse


def build_command(recipe: str, overrides: list[str]) -> list[str]:
    return ["minitron", "run", recipe, *overrides]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--account")
    parser.add_argument("--partition")
    parser.add_argument("--container", default="ghcr.io/minitron-nemo/minitron-nemo:0.1.0")
    parser.add_argument("--dryrun", action="store_true")
    args = parser.parse_args()

    import nemo_run as run  # optional dependency: needs leptonai<0.47 to import

    if args.executor == "local":
        executor = run.LocalExecutor()
    else:
        executor = run.SlurmExecutor(
            account=args.account,
            partition=args.partition,
            nodes=1,
            ntasks_per_node=1,
            gpus_per_node=args.gpus,
            container_image=args.container,
        )
    task = run.Script(inline=" ".join(build_command(args.recipe, args.overrides)))
    run.run(task, executor=executor, name="minitron", dryrun=args.dryrun)


if __name__ == "__main__":
    main()
