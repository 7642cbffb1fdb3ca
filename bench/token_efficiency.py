"""How many fewer training tokens distillation needs than training from scratch (Minitron's
headline), measured on the default's pruned student.

1. Data: gensim's Lee news corpus and its Wikipedia sample (500 articles), each prepared with
   `minitron data prepare` (SmolLM2's tokenizer) and blended by their token counts;
   megatron's document-level split "95,0,5": the test part (the same documents for every run,
   never trained on) gives the held-out samples.
2. `minitron prune` with the default recipe on that blend: the converted teacher, the data
   stage and the width-pruned student (hidden 576 -> 432, MLP 1536 -> 768).
3. At each token budget (default 15k, 61k, 246k tokens = 15, 60, 240 steps of 8 x 128): the
   student distilled (the default's settings: forward KL, lr 1e-3 -> 1e-4 cosine, 10% warmup)
   and the same architecture trained from random init with the LM loss (the scratch stage's
   settings), and scratch alone at --scratch-budgets (default 492k tokens, about one pass over
   the train split) so that its curve can reach the distilled losses. The scratch learning
   rate is tuned once, at the middle budget, over --scratch-lrs (lowest held-out loss wins)
   and used at every budget.
4. Held-out loss of every point (HF export, the same 64 x 128 held-out tokens), the teacher's
   and the pruned student's before training; for each distilled point the multiple of tokens
   scratch needs to reach its loss, interpolated on the scratch curve in log tokens ("> N x"
   when scratch never gets there within its largest budget).

Optional variants (--variants): `kd_lm` (KD + LM loss) and `depth` (the depth recipe's student,
distilled). Every point is a run directory under --work with its result.json; a rerun skips what
is complete and resumes an interrupted training from its last checkpoint, and reuses the
teacher's and the pruned student's held-out losses (WORK/lines.json). Output:
WORK/token_efficiency.md (table), WORK/token_efficiency.png (held-out loss vs tokens, log x),
WORK/results.json.

usage: .venv/bin/python bench/token_efficiency.py [--work /tmp/minitron_token_efficiency]
           [--budgets 15360 61440 245760] [--scratch-budgets 491520] [--scratch-lrs 1e-3 3e-3]
           [--variants kd scratch]
           [--base RUN_DIR]   # reuse a run's teacher/, data/ and prune/ instead of step 1-2
           [--heldout-samples N]   # the first N held-out samples only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEQ, BATCH = 128, 8
CORPORA = {"lee": "gensim:lee_background", "wiki": "gensim:wiki_head500"}
VARIANTS = {  # name -> (student run, loss mode, lm_weight, label)
    "kd": ("base", "distill", 0.0, "distilled (KD)"),
    "scratch": ("base", "lm", 0.0, "scratch (LM)"),
    "kd_lm": ("base", "distill", 1.0, "distilled (KD + LM)"),
    "depth": ("depth", "distill", 0.0, "depth-pruned, distilled (KD)"),
}


def tokens_to_reach(curve: list[tuple[float, float]], loss: float) -> float | None:
    """Tokens at which a (tokens, loss) curve first reaches `loss`, interpolated linearly in
    log(tokens) between the two points around the crossing; None when it never does. A curve
    already at or below `loss` at its first point returns that point's tokens (an upper bound)."""
    curve = sorted(curve)
    for i, (tokens, value) in enumerate(curve):
        if value <= loss:
            if i == 0:
                return tokens
            (t0, l0), (t1, l1) = curve[i - 1], (tokens, value)
            frac = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
    return None


def multiple_label(scratch: list[tuple[float, float]], tokens: float, loss: float) -> str:
    """'12.3x' (scratch tokens to reach `loss` / `tokens`), '> N x' when scratch never does,
    '<= N x' when scratch's smallest budget is already there."""
    reached = tokens_to_reach(scratch, loss)
    if reached is None:
        return f"> {max(t for t, _ in scratch) / tokens:.1f}x"
    if reached == min(t for t, _ in scratch):
        return f"<= {reached / tokens:.1f}x"
    return f"{reached / tokens:.1f}x"


def minitron(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "minitron_nemo.cli", *args], cwd=REPO, check=True)


def prepare_data(work: Path) -> list[list]:
    """Each corpus tokenised once with `minitron data prepare`; blend weights = token counts."""
    from minitron_nemo.data.sources import smollm2_hf_dir

    blend = []
    for name, source in CORPORA.items():
        prefix = work / "data" / f"{name}_text_document"
        if not Path(f"{prefix}.json").is_file():
            minitron("data", "prepare", "--input", source, "--tokenizer", str(smollm2_hf_dir()),
                     "--out", str(prefix))  # fmt: skip
        blend.append([json.loads(Path(f"{prefix}.json").read_text())["tokens"], str(prefix)])
    return blend


def prepare_student(work: Path, name: str, recipe: str, blend: list[list]) -> Path:
    """`minitron prune RECIPE` on the blend into WORK/NAME (skipped when complete)."""
    run_dir = work / name
    overrides = [
        f"run_dir={run_dir}",
        f"data.blend={json.dumps(blend)}",
        'data.split="95,0,5"',
        "data.heldout_samples=64",
        "eval.tasks=[]",
    ]
    minitron("prune", "--config", str(REPO / "recipes" / recipe), *overrides)
    return run_dir


def data_spec(run_dir: Path, cache: Path):
    """The run's data, with megatron's index cache in the bench's work directory (the run
    directory is only read)."""
    from minitron_nemo.data.stage import load_spec

    spec = load_spec(json.loads((run_dir / "data" / "data.json").read_text()), run_dir)
    return dataclasses.replace(spec, cache_dir=str(cache))


def heldout_batches(spec, limit: int | None = None) -> list:
    """The held-out samples (the first `limit` of them) in batches of 8."""
    from minitron_nemo.data.datasets import heldout_indices, heldout_reader

    return heldout_reader(spec).read(heldout_indices(spec)[:limit]).split(8)


def hf_loss(hf_dir: Path, batches: list) -> float:
    from minitron_nemo.eval.lm import heldout_loss, load_hf_model

    return heldout_loss(load_hf_model(hf_dir), batches)


def reference_lines(work: Path, base: Path, batches: list) -> dict[str, float]:
    """Held-out loss of the teacher and of the pruned student before training, kept in
    WORK/lines.json for the same base run and held-out tokens (a rerun reuses them)."""
    import hashlib

    from minitron_nemo import atomic
    from minitron_nemo.data.sources import smollm2_hf_dir

    digest = hashlib.sha256(b"".join(b.numpy().tobytes() for b in batches)).hexdigest()
    key = {"base": str(base), "heldout_sha256": digest}
    saved = atomic.read_json(work / "lines.json")
    if saved is not None and saved.get("key") == key:
        return saved["lines"]
    lines = {
        "teacher": hf_loss(smollm2_hf_dir(), batches),
        "pruned, no training": hf_loss(base / "prune" / "hf", batches),
    }
    atomic.write_json(work / "lines.json", {"key": key, "lines": lines})
    return lines


def run_point(out: Path, run_dir: Path, spec, mode: str, lm_weight: float, tokens: int,
              lr: float, batches: list) -> dict:  # fmt: skip
    """Train one point into `out` (resumable) and measure its held-out loss; result.json marks
    it complete, after which its checkpoints are deleted (only the numbers are kept)."""
    from minitron_nemo import atomic
    from minitron_nemo.config import DistillConfig
    from minitron_nemo.convert.mcore_to_hf import mcore_to_hf
    from minitron_nemo.distill.train import train

    result_file = out / "result.json"
    done = atomic.read_json(result_file)
    if done is not None:
        return done
    steps = max(1, round(tokens / (SEQ * BATCH)))
    cfg = DistillConfig(
        mode=mode, lm_weight=lm_weight, steps=steps, global_batch_size=BATCH,
        micro_batch_size=BATCH, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10),
        save_every=max(2, math.ceil(steps / 4)), kd_chunk_tokens=512,
    )  # fmt: skip
    # save_every: 4 resume points a training, never after every step (a point of 1-2 steps,
    # the test's budgets, saved a ~1 GB checkpoint after each: ~10 s a step on 2 cores)
    start = time.time()
    teacher = run_dir / "teacher" if mode == "distill" else None
    final = train(run_dir / "prune" / "ckpt", out, cfg, spec, teacher,
                  init_random=mode == "lm")  # fmt: skip
    mcore_to_hf(final, out / "hf", force=True)
    result = {
        "tokens": steps * SEQ * BATCH,
        "steps": steps,
        "lr": lr,
        "heldout_loss": hf_loss(out / "hf", batches),
        "train_seconds": time.time() - start,
    }
    atomic.write_json(result_file, result)
    shutil.rmtree(out / "hf")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


def plot(curves: dict[str, list[tuple[float, float]]], lines: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        xs, ys = zip(*sorted(curve), strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    for (label, value), style in zip(lines.items(), ["--", ":"], strict=False):
        ax.axhline(value, linestyle=style, color="gray", label=f"{label} ({value:.2f})")
    ax.set_xscale("log")
    ticks = sorted({t for curve in curves.values() for t, _ in curve})
    ax.set_xticks(ticks, [f"{t / 1000:.0f}k" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss")
    ax.set_title("Pruned SmolLM2-135M student: distillation vs training from scratch")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(curves: dict[str, list], scratch: list, lines: dict[str, float]) -> str:
    budgets = sorted({t for curve in curves.values() for t, _ in curve})
    head = "| training tokens | " + " | ".join(curves) + " | scratch tokens to match KD |"
    rows = [head, "|" + "---|" * (len(curves) + 2)]
    kd = dict(curves.get("distilled (KD)", []))
    for tokens in budgets:
        cells = [f"{dict(c)[tokens]:.3f}" if tokens in dict(c) else "-" for c in curves.values()]
        match = multiple_label(scratch, tokens, kd[tokens]) if tokens in kd and scratch else "-"
        rows.append(f"| {tokens:,} | " + " | ".join(cells) + f" | {match} |")
    rows += ["", *(f"{label}: {value:.3f}" for label, value in lines.items())]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/minitron_token_efficiency"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[15360, 61440, 245760])
    parser.add_argument(
        "--scratch-budgets",
        type=int,
        nargs="*",
        default=[491520],
        help="extra budgets for scratch only (it needs more tokens)",
    )
    parser.add_argument("--scratch-lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--variants", nargs="+", default=["kd", "scratch"], choices=VARIANTS)
    parser.add_argument("--base", type=Path, help="existing run directory to start from")
    parser.add_argument("--heldout-samples", type=int,
                        help="score the first N held-out samples only (default: all)")  # fmt: skip
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bench_start = time.time()

    students = {"base": args.base.resolve() if args.base else None, "depth": None}
    if students["base"] is None or "depth" in args.variants:
        blend = prepare_data(work)
        students["base"] = students["base"] or prepare_student(
            work, "base", "smollm2_135m_cpu.yaml", blend
        )
        if "depth" in args.variants:
            students["depth"] = prepare_student(work, "depth", "smollm2_135m_cpu_depth.yaml", blend)
    spec = data_spec(students["base"], work / "index_cache")
    batches = heldout_batches(spec, args.heldout_samples)
    lines = reference_lines(work, students["base"], batches)
    budgets = sorted(args.budgets)
    scratch_budgets = sorted({*budgets, *args.scratch_budgets})
    mid = budgets[len(budgets) // 2]
    plan = [("scratch", mid, lr) for lr in args.scratch_lrs] if "scratch" in args.variants else []
    plan += [(v, b, 1e-3) for v in args.variants if v != "scratch" for b in budgets]
    results: dict[tuple[str, int, float], dict] = {}
    total = len(plan) + (len(scratch_budgets) - 1 if "scratch" in args.variants else 0)
    left_tokens = [sum(t for _, t, _ in plan)]
    if "scratch" in args.variants:
        left_tokens[0] += sum(scratch_budgets) - mid

    def point(variant: str, tokens: int, lr: float) -> dict:
        student, mode, lm_weight, label = VARIANTS[variant]
        out = work / "points" / f"{variant}_lr{lr:g}_{tokens}"
        start = time.time()
        result = run_point(out, students[student], spec, mode, lm_weight, tokens, lr, batches)
        results[(variant, tokens, lr)] = result
        left_tokens[0] -= tokens
        elapsed = time.time() - start
        print(f"[{len(results)}/{total}] {label} lr {lr:g}, {result['tokens']:,} tokens: "
              f"held-out {result['heldout_loss']:.3f} ({elapsed:.0f} s; about "
              f"{left_tokens[0] * elapsed / tokens / 60:.0f} min left at this rate)",
              flush=True)  # fmt: skip
        return result

    scratch_lr = None
    if "scratch" in args.variants:
        tuned = {lr: point("scratch", mid, lr)["heldout_loss"] for lr in args.scratch_lrs}
        scratch_lr = min(tuned, key=tuned.get)
        plan += [("scratch", b, scratch_lr) for b in scratch_budgets if b != mid]
    for variant, tokens, lr in list(plan):
        if (variant, tokens, lr) not in results:
            point(variant, tokens, lr)

    curves: dict[str, list[tuple[float, float]]] = {}
    for variant in args.variants:
        lr = scratch_lr if variant == "scratch" else 1e-3
        label = VARIANTS[variant][3] + (f", lr {lr:g}" if variant == "scratch" else "")
        curves[label] = [
            (results[(variant, b, lr)]["tokens"], results[(variant, b, lr)]["heldout_loss"])
            for b in (scratch_budgets if variant == "scratch" else budgets)
        ]
    scratch = next((c for label, c in curves.items() if label.startswith("scratch")), [])
    curves = {("distilled (KD)" if k == VARIANTS["kd"][3] else k): v for k, v in curves.items()}
    md = table(curves, scratch, lines)
    if scratch_lr is not None:
        md += "\n\nscratch learning rate tuned at {:,} tokens: {}".format(
            mid, ", ".join(f"{lr:g} -> {loss:.3f}" for lr, loss in tuned.items())
        )
    trained = sum(r["train_seconds"] for r in results.values()) / 60
    md += (f"\n\nbench wall time: {(time.time() - bench_start) / 60:.1f} min (this run); "
           f"training + export + held-out loss of the points: {trained:.1f} min")  # fmt: skip
    (work / "token_efficiency.md").write_text(md + "\n")
    plot(curves, lines, work / "token_efficiency.png")
    (work / "results.json").write_text(json.dumps({
        "points": [{"variant": v, "lr": lr, **r} for (v, _, lr), r in results.items()],
        "lines": lines, "scratch_lr": scratch_lr,
    }, indent=2))  # fmt: skip
    print(md)
    print(f"wrote {work / 'token_efficiency.md'} and {work / 'token_efficiency.png'}")


if __name__ == "__main__":
    main()
