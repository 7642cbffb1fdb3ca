"""One KD step (teacher forward + student forward/backward + KD loss + optimizer) of our
megatron stack against a plain HF-transformers KD loop on the same shapes, device and run.

usage: .venv/bin/python bench/kd_throughput.py [--teacher smollm2|HF_DIR] [--student HF_DIR]
           [--seq 128] [--mbs 4] [--steps 6] [--dtype fp32|bf16]
Without --student the teacher is width-pruned (hidden x0.75, MLP x0.5) by plain slicing.
Reports tokens/s, MFU against a measured matmul peak, and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 50 if device.type == "cuda" else 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def hf_kd_step_rate(
    teacher_dir: Path, student_dir: Path, data: torch.Tensor, args, device, dtype
) -> dict:
    from minitron_nemo.eval.lm import load_hf_model

    teacher = load_hf_model(teacher_dir, dtype).to(device).eval()
    student = load_hf_model(student_dir, dtype).to(device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    times = []
    for step in range(args.steps):
        batch = data[step * args.mbs : (step + 1) * args.mbs].to(device)
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
    step_time = sum(times[1:]) / len(times[1:])
    return {
        "tokens_per_s": args.mbs * args.seq / step_time,
        "step_s": step_time,
        "peak_memory_gib": peak_memory_gib(device),
    }


def main() -> None:
    from minitron_nemo.config import DistillConfig, PruneConfig
    from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
    from minitron_nemo.data.sources import smollm2_hf_dir
    from minitron_nemo.distill.train import train
    from minitron_nemo.metrics import read_metrics
    from minitron_nemo.models.arch import ModelArch
    from minitron_nemo.prune.stage import run_prune

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--student", type=Path, default=None)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    teacher_hf = smollm2_hf_dir() if args.teacher == "smollm2" else Path(args.teacher)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf_to_mcore(teacher_hf, tmp / "teacher", dtype=args.dtype)
        arch = ModelArch.load(tmp / "teacher" / "arch.yaml")
        vocab = arch.vocab_size
        data = torch.randint(
            0,
            vocab,
            (args.steps * args.mbs + 64, args.seq + 1),
            generator=torch.Generator().manual_seed(0),
        )
        if args.student is None:
            hidden = (
                arch.hidden_size * 3 // 4 // arch.num_attention_heads * arch.num_attention_heads
            )
            run_prune(
                tmp / "teacher",
                tmp / "prune",
                PruneConfig(
                    hidden_size=hidden,
                    ffn_hidden_size=arch.ffn_hidden_size // 2,
                    depth_scores=False,
                    depth_eval_samples=1,
                ),
                data[:3],
            )
            student_ckpt, student_hf = tmp / "prune" / "ckpt", tmp / "prune" / "hf"
        else:
            student_hf = args.student
            hf_to_mcore(student_hf, tmp / "student", dtype=args.dtype)
            student_ckpt = tmp / "student"
        peak = matmul_peak_flops(device, dtype)
        t_params = arch.num_parameters()
        s_params = ModelArch.load(student_ckpt / "arch.yaml").num_parameters()
        flops_per_token = 2 * t_params + 6 * s_params  # matmul FLOPs, attention scores ignored
        hf = hf_kd_step_rate(teacher_hf, student_hf, data, args, device, dtype)
        cfg = DistillConfig(
            steps=args.steps,
            global_batch_size=args.mbs,
            micro_batch_size=args.mbs,
            warmup_steps=1,
            save_every=10**9,
            kd_chunk_tokens=1024,
        )
        start = time.perf_counter()
        train(student_ckpt, tmp / "kd", cfg, data, tmp / "teacher")
        wall = time.perf_counter() - start
        rates = [m["tokens_per_s"] for m in read_metrics(tmp / "kd")][1:]
        ours = {
            "tokens_per_s": sum(rates) / len(rates),
            "peak_memory_gib": peak_memory_gib(device),
            "wall_s_incl_startup": wall,
        }
    for result in (hf, ours):
        result["mfu"] = result["tokens_per_s"] * flops_per_token / peak
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "dtype": args.dtype,
                "seq": args.seq,
                "micro_batch": args.mbs,
                "teacher_params": t_params,
                "student_params": s_params,
                "matmul_peak_tflops": peak / 1e12,
                "hf": hf,
                "minitron": ours,
                "speedup": ours["tokens_per_s"] / hf["tokens_per_s"],
                "note": "on CPU peak memory is the process max RSS (both runs in one process)",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
