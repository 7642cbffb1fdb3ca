"""One KD step (teacher forward + student forward/backward + KD loss + optimizer) of our megatron
stack against a plain HF-transformers KD loop, same shapes, device and data.

usage: .venv/bin/python bench/kd_throughput.py [--shape smollm2|1.2b|8b] [--seq 128] [--mbs 4]
           [--steps 6] [--dtype fp32|bf16] [--work DIR] [--cpu-compile]
  smollm2: SmolLM2-135M-Instruct (real weights) -> width-pruned student (hidden x0.75, MLP x0.5)
  1.2b:    random Llama-3.2-1B shapes -> random 0.74B student (hidden 1536, MLP 6144)
  8b:      random Llama-3.1-8B shapes -> random Minitron-4B-Width student (hidden 3072, MLP 9216)
A rerun with the same arguments reuses the models and data prepared in --work. Each loop runs
in its own process (peak memory is its own: max RSS on CPU, max allocated on GPU). A shared
machine's speed drifts by 10-20% within a run, so the loops run in --rounds rounds, interleaved
and in alternating order (HF, ours, ours compiled; then ours compiled, ours, HF; ...): each
loop's rate is the median over all its timed steps, reported with their range, and the speedup
is the ratio of the medians, with the per-round ratios next to it. A virtual machine's host can
take CPU time from it (steal time; up to 23% of a 5-s window was measured on the 2-core CI
machines), which only ever slows a step, so the fastest step of each loop is reported too
(`tokens_per_s_best`, as `timeit` takes the minimum) with its ratio (`speedup_best`), and
`host_steal` says what fraction of the CPU time the host took during each run (/proc/stat).
--cpu-compile adds a loop of ours with `distill.cpu_compile` (CPU only: the layers and the KD
loss through torch.compile). The first step of every loop is not timed (warm-up; with
--cpu-compile it is the compilation). Prints one JSON object: tokens/s, MFU, peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LLAMA3 = dict(
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
)
SHAPES = {  # teacher, student (random weights)
    "1.2b": (
        dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             head_dim=64, tie_word_embeddings=True),
        dict(hidden_size=1536, intermediate_size=6144),
    ),
    "8b": (
        dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             head_dim=128, tie_word_embeddings=False),
        dict(hidden_size=3072, intermediate_size=9216),
    ),
}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def random_llama(out: Path, config: dict, dtype: torch.dtype, seed: int) -> Path:
    """An HF Llama directory with random weights (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", **config)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out)
    return out


def random_token_data(root: Path, vocab: int, args):
    """An indexed dataset of random token documents, enough for both loops' steps."""
    import numpy

    from minitron_nemo.data.datasets import DataSpec, build_indices
    from minitron_nemo.data.indexed import IndexedWriter, token_dtype

    samples = args.steps * args.mbs + 64
    tokens = numpy.random.default_rng(0).integers(0, vocab, samples * (args.seq + 1))
    writer = IndexedWriter(root / "random", token_dtype(vocab))
    writer.add_documents(tokens, numpy.full(samples, args.seq + 1))
    writer.finalize()
    spec = DataSpec(
        prefixes=(str(root / "random"),),
        weights=(1.0,),
        split="1,0,0",
        seq_length=args.seq,
        seed=0,
        cache_dir=str(root / "cache"),
        vocab_size=vocab,
        eod=0,
        heldout_samples=0,
        calibration_samples=3,
    )
    build_indices(spec, ("calibration",))
    return spec


PREPARED = ("teacher", "teacher_hf", "student", "student_hf", "prune", "data", "kd")
"""What `prepare` and the loops write under --work (a rerun with other arguments removes them)."""


def prepare(args, work: Path) -> dict:
    """Teacher and student as HF directories and megatron checkpoints, and the data."""
    from minitron_nemo.config import PruneConfig
    from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
    from minitron_nemo.data.sources import smollm2_hf_dir
    from minitron_nemo.models.arch import ModelArch
    from minitron_nemo.prune.stage import run_prune

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.shape == "smollm2":
        teacher_hf = smollm2_hf_dir()
    else:
        teacher_cfg, _ = SHAPES[args.shape]
        teacher_hf = random_llama(work / "teacher_hf", teacher_cfg, dtype, seed=1)
    hf_to_mcore(teacher_hf, work / "teacher", dtype=args.dtype)
    arch = ModelArch.load(work / "teacher" / "arch.yaml")
    data = random_token_data(work / "data", arch.vocab_size, args)
    if args.shape == "smollm2":
        hidden = arch.hidden_size * 3 // 4 // arch.num_attention_heads * arch.num_attention_heads
        targets = PruneConfig(
            hidden_size=hidden,
            ffn_hidden_size=arch.ffn_hidden_size // 2,
            depth_scores=False,
            depth_eval_samples=1,
        )
        run_prune(work / "teacher", work / "prune", targets, data)
        student_ckpt, student_hf = work / "prune" / "ckpt", work / "prune" / "hf"
    else:
        teacher_cfg, student_sizes = SHAPES[args.shape]
        student_hf = random_llama(work / "student_hf", {**teacher_cfg, **student_sizes}, dtype, 2)
        hf_to_mcore(student_hf, work / "student", dtype=args.dtype)
        student_ckpt = work / "student"
    return {
        "teacher_hf": str(teacher_hf),
        "student_hf": str(student_hf),
        "teacher_ckpt": str(work / "teacher"),
        "student_ckpt": str(student_ckpt),
        "data": data.__dict__,
    }


def run_hf(args, paths: dict) -> dict:
    import dataclasses

    from minitron_nemo.data.datasets import DataSpec, SampleReader, build_indices
    from minitron_nemo.eval.lm import load_hf_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    data = DataSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in paths["data"].items()})
    data = dataclasses.replace(data, train_samples=args.steps * args.mbs)
    build_indices(data, ("train",))
    reader = SampleReader(data, "train")  # the same samples, in the same order, as ours
    teacher = load_hf_model(Path(paths["teacher_hf"]), dtype).to(device).eval()
    student = load_hf_model(Path(paths["student_hf"]), dtype).to(device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    times = []
    for step in range(args.steps):
        batch = reader.read(range(step * args.mbs, (step + 1) * args.mbs)).to(device)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(batch[:, :-1]).logits.float()
        s_logits = student(batch[:, :-1]).logits.float()
        loss = F.kl_div(
            s_logits.log_softmax(-1).flatten(0, 1),
            t_logits.log_softmax(-1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return {
        "step_rates": [args.mbs * args.seq / t for t in times[1:]],
        "first_step_s": times[0],
        "peak_memory_gib": peak_memory_gib(device),
    }


def run_ours(args, paths: dict, work: Path) -> dict:
    import shutil

    from minitron_nemo.config import DistillConfig
    from minitron_nemo.data.datasets import DataSpec
    from minitron_nemo.distill.train import train
    from minitron_nemo.metrics import read_metrics

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = DataSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in paths["data"].items()})
    cfg = DistillConfig(
        steps=args.steps,
        global_batch_size=args.mbs,
        micro_batch_size=args.mbs,
        warmup_steps=1,
        save_every=10**9,
        kd_chunk_tokens=args.kd_chunk_tokens,
        clip_grad=0.0,  # the HF loop does not clip either
        cpu_compile="on" if args.role == "ours_compiled" else "off",
    )
    shutil.rmtree(work / "kd", ignore_errors=True)
    train(Path(paths["student_ckpt"]), work / "kd", cfg, data, Path(paths["teacher_ckpt"]))
    metrics = read_metrics(work / "kd")
    return {
        "step_rates": [m["tokens_per_s"] for m in metrics][1:],
        "first_step_s": metrics[0]["step_time_s"],
        "peak_memory_gib": peak_memory_gib(device),
    }


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (user ... steal, in ticks) from /proc/stat; None where
    there is none (not Linux)."""
    try:
        with open("/proc/stat") as stat:
            return [int(x) for x in stat.readline().split()[1:9]]
    except OSError:
        return None


def steal_fraction(before: list[int] | None, after: list[int] | None) -> float | None:
    """The fraction of the CPU time between two `cpu_times` that the hypervisor took."""
    if before is None or after is None:
        return None
    delta = [a - b for a, b in zip(after, before, strict=True)]
    # /proc/stat's columns: user nice system idle iowait irq softirq steal
    return delta[7] / max(sum(delta), 1)


def summarize(rounds: list[dict], flop_fraction: float) -> dict:
    """One loop's runs: the median rate over all timed steps, their range, each round's median;
    the first steps; the largest peak memory. `flop_fraction` (FLOPs per token / peak FLOP/s)
    turns tokens/s into MFU."""
    rates = [r for run in rounds for r in run["step_rates"]]
    median = statistics.median(rates)
    return {
        "tokens_per_s": median,
        "tokens_per_s_best": max(rates),
        "tokens_per_s_range": [min(rates), max(rates)],
        "round_medians": [statistics.median(run["step_rates"]) for run in rounds],
        "timed_steps": len(rates),
        "host_steal": [run["host_steal"] for run in rounds],
        "first_step_s": [run["first_step_s"] for run in rounds],
        "peak_memory_gib": max(run["peak_memory_gib"] for run in rounds),
        "mfu": median * flop_fraction,
    }


def compare(ours: dict, hf: dict, suffix: str) -> dict:
    """Speedup (the ratio of the medians, each round's ratio, the ratio of the fastest steps) and
    the peak memory ratio of one of our loops against the HF loop."""
    per_round = [o / h for o, h in zip(ours["round_medians"], hf["round_medians"], strict=True)]
    return {
        f"speedup{suffix}": ours["tokens_per_s"] / hf["tokens_per_s"],
        f"speedup{suffix}_per_round": per_round,
        f"speedup{suffix}_best": ours["tokens_per_s_best"] / hf["tokens_per_s_best"],
        f"memory_ratio{suffix}": ours["peak_memory_gib"] / hf["peak_memory_gib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="smollm2", choices=["smollm2", *SHAPES])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--kd-chunk-tokens", type=int, default=4096)
    parser.add_argument("--work", type=Path, default=Path("/tmp/minitron_kd_bench"))
    parser.add_argument("--cpu-compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the loops")
    parser.add_argument("--role", choices=["hf", "ours", "ours_compiled"])
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    paths_file = args.work / "paths.json"
    if args.role:  # one loop, in this process
        paths = json.loads(paths_file.read_text())
        result = run_hf(args, paths) if args.role == "hf" else run_ours(args, paths, args.work)
        print("RESULT " + json.dumps(result))
        return
    from minitron_nemo.models.arch import ModelArch

    args.work.mkdir(parents=True, exist_ok=True)
    key = {k: getattr(args, k) for k in ("shape", "seq", "mbs", "steps", "dtype")}
    paths = json.loads(paths_file.read_text()) if paths_file.is_file() else {}
    if paths.get("key") != key:  # prepared for other arguments (or not at all): again
        import shutil

        paths_file.unlink(missing_ok=True)
        for name in PREPARED:
            shutil.rmtree(args.work / name, ignore_errors=True)
        paths = {**prepare(args, args.work), "key": key}
        paths_file.write_text(json.dumps(paths))

    def role(name: str) -> dict:
        cmd = [sys.executable, __file__, "--role", name, *sys.argv[1:]]
        before = cpu_times()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
        return {**result, "host_steal": steal_fraction(before, cpu_times())}

    names = ["hf", "ours"] + (["ours_compiled"] if args.cpu_compile else [])
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.rounds):  # alternating order: drift hits every loop alike
        for name in names if round_index % 2 == 0 else names[::-1]:
            runs[name].append(role(name))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak = matmul_peak_flops(device, dtype)
    t_arch = ModelArch.load(Path(paths["teacher_ckpt"]) / "arch.yaml")
    s_arch = ModelArch.load(Path(paths["student_ckpt"]) / "arch.yaml")
    flops_per_token = 2 * t_arch.num_parameters() + 6 * s_arch.num_parameters()
    results = {name: summarize(rounds, flops_per_token / peak) for name, rounds in runs.items()}
    hf, ours = results["hf"], results["ours"]
    extra = {}
    if args.cpu_compile:
        extra = {
            "minitron_cpu_compile": results["ours_compiled"],
            **compare(results["ours_compiled"], hf, "_cpu_compile"),
        }
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "shape": args.shape,
                "dtype": args.dtype,
                "seq": args.seq,
                "micro_batch": args.mbs,
                "teacher_params": t_arch.num_parameters(),
                "student_params": s_arch.num_parameters(),
                "matmul_peak_tflops": peak / 1e12,
                "rounds": args.rounds,
                "hf": hf,
                "minitron": ours,
                **compare(ours, hf, ""),
                **extra,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
