"""What a training shows while it runs: metrics.jsonl, TensorBoard scalars and a progress bar.

Loss terms stay on the device as running sums; every `log_every` steps (and at the end) they are
reduced over the pipeline (terms live on different stages) and data-parallel ranks in one
collective and read on the host once, so the loop syncs with the device only then. Logged per
window: each loss term, lr, grad norm, skipped (non-finite) steps, tokens/s, MFU, peak memory,
step time and data time.

MFU counts matmul FLOPs per token: 2 x weights (+ causal attention 2 x seq x attention width per
layer) for the teacher's forward and 3x that for the student's forward + backward, against the
device's dense peak (a table for known GPUs, `distill.peak_tflops`, or a short matmul measurement
on a CPU).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_nemo.models.arch import ModelArch
from minitron_nemo.runtime.progress import Progress

TERMS = ("loss", "loss_logits", "loss_lm", "loss_intermediate", "loss_moe_aux")
# Dense peak FLOP/s by device name fragment (bf16 / fp32-as-tf32), from the vendors' sheets.
GPU_PEAKS = {"H200": (989e12, 495e12), "H100": (989e12, 495e12), "A100": (312e12, 156e12)}


def forward_flops_per_token(arch: ModelArch, seq_length: int) -> float:
    """Matmul FLOPs of one forward pass per token (embedding lookups excluded)."""
    weights = arch.num_parameters(include_embeddings=False) + arch.vocab_size * arch.hidden_size
    attention = 2 * seq_length * arch.num_attention_heads * arch.head_dim * arch.num_layers
    return 2.0 * weights + attention


def peak_flops(dtype: torch.dtype, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, (bf16, fp32) in GPU_PEAKS.items():
            if key in name:
                return bf16 if dtype == torch.bfloat16 else fp32
        return None
    n = 512  # CPU: a short measurement (noisy; ratios within one run are what count)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(8):
        a @ b
    return 2 * n**3 * 8 / (time.perf_counter() - start)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class TrainMonitor:
    """Accumulates each step's terms on the device; logs a window every `log_every` steps."""

    def __init__(
        self,
        out: Path,
        mode: str,
        total_steps: int,
        start_step: int,
        log_every: int,
        logging_rank: bool,
        device: torch.device,
        flops_per_token: float,
        peak: float | None,
        world_size: int,
        groups: list,
    ) -> None:
        self.out = out
        self.mode = mode
        self.log_every = log_every
        self.logging_rank = logging_rank
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self.groups = groups  # process groups to reduce over (PP, then DP)
        self.metrics_path = out / "metrics.jsonl"
        self.writer = None
        if logging_rank:
            self._forget_after(start_step)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        self.bar = Progress(total_steps, f"{mode} steps", enabled=logging_rank, rank0_only=False)
        self.bar.update(start_step)
        self.skipped_total = 0
        self._reset()

    def _forget_after(self, step: int) -> None:
        """Resumed: drop logged steps after the checkpoint the run restarts from."""
        if self.metrics_path.is_file():
            kept = [
                line
                for line in self.metrics_path.read_text().splitlines()
                if json.loads(line)["step"] <= step
            ]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _reset(self) -> None:
        # Row 0: sums of each term over steps; row 1: number of steps that had the term.
        self.sums = torch.zeros(2, len(TERMS), dtype=torch.float64, device=self.device)
        self.steps = self.tokens = self.skipped = 0
        self.step_time = self.data_time = 0.0

    def add(self, terms: dict[str, torch.Tensor], tokens: int, step_time: float,
            data_time: float, skipped: bool) -> None:  # fmt: skip
        """One step's terms (device scalars present on this rank) and timings."""
        for i, key in enumerate(TERMS):
            if key in terms:
                self.sums[0, i] += terms[key].detach().double()
                self.sums[1, i] += 1
        self.steps += 1
        self.tokens += tokens
        self.step_time += step_time
        self.data_time += data_time
        self.skipped += int(skipped)
        self.skipped_total += int(skipped)
        self.bar.update(1)

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.log_every == 0

    def log(self, step: int, lr: float, grad_norm: float, alpha: float | None) -> dict:
        """Reduce the window over ranks (collective: every rank calls it) and write it."""
        sums = self.sums.clone()
        pp_group, dp_group = self.groups
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            dist.all_reduce(sums, group=pp_group)
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(sums, group=dp_group)
        values, counts = sums.tolist()  # the one host sync of the window
        logs: dict[str, float] = {
            key: values[i] / counts[i] for i, key in enumerate(TERMS) if counts[i] > 0
        }
        if alpha is not None and "loss_intermediate" in logs:
            logs["alpha"] = alpha  # the weight the window's last step trained with
            logs["loss"] = logs.get("loss", 0.0) + alpha * logs["loss_intermediate"]
        tokens_per_s = self.tokens / max(self.step_time, 1e-9)
        logs.update(
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=tokens_per_s,
            step_time_s=self.step_time / max(self.steps, 1),
            data_time_s=self.data_time / max(self.steps, 1),
            peak_memory_gib=peak_memory_gib(self.device),
            skipped_steps=self.skipped_total,
        )
        if self.peak:
            logs["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.world_size)
        logs["step"] = step
        if self.logging_rank:
            for key, value in logs.items():
                if key != "step":
                    self.writer.add_scalar(f"{self.mode}/{key}", value, step)
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(logs) + "\n")
            self.bar.postfix(loss=logs.get("loss", float("nan")), tok_s=tokens_per_s)
        self._reset()
        return logs

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
