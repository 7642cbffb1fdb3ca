"""Start a training (distillation, or the LM loss alone: scratch baseline, teacher correction)
on its ranks, and report how it ended. The loop each rank runs is distill/trainer.py.

Before the ranks start: the config is checked against the environment (FP8 needs TE) and the
checkpoints (tokenizers match, intermediate pairs exist and share a pipeline stage), and the train
view of the data is built for exactly this training's steps x global batch. Afterwards the
outcome written by rank 0 decides: done (the final checkpoint), stopped by a signal after saving
(`Stopped`: rerun the same command to resume), or stopped by repeated non-finite steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from minitron_nemo import atomic, checkpoint
from minitron_nemo.config import DistillConfig
from minitron_nemo.data.datasets import DataSpec
from minitron_nemo.distill.checkpoints import async_save_available
from minitron_nemo.errors import MinitronError, Stopped
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.runtime.launch import run_on_ranks

log = logging.getLogger(__name__)


def check_environment(cfg: DistillConfig) -> None:
    """What the config cannot know: what this machine has (TE, GPUs, resiliency-ext)."""
    from minitron_nemo.models.build import resolve_te

    resolve_te(cfg.transformer_engine, cfg.fp8)
    if cfg.async_save and not async_save_available():
        raise MinitronError(
            "distill.async_save needs a GPU and nvidia-resiliency-ext (in the NGC containers); "
            "set it to null (auto) or false"
        )


def check_pairs(pairs: list[list[int]], student: ModelArch, teacher: ModelArch, pp: int) -> None:
    """Each (student layer, teacher layer) pair must exist and run on the same pipeline stage
    (layers are split evenly over stages)."""
    for pair in pairs:  # [s, t] with s, t >= 0: checked by DistillConfig
        s, t = pair
        if not (0 <= s < student.num_layers and 0 <= t < teacher.num_layers):
            raise MinitronError(
                f"distill.intermediate_pairs: {pair} is out of range (student has "
                f"{student.num_layers} layers, teacher {teacher.num_layers})"
            )
        s_stage = s // (student.num_layers // pp)
        t_stage = t // (teacher.num_layers // pp)
        if s_stage != t_stage:
            raise MinitronError(
                f"distill.intermediate_pairs: {pair} puts student layer {s} on pipeline stage "
                f"{s_stage} and teacher layer {t} on stage {t_stage}; pairs must share a stage"
            )


def resolve_cpu_compile(
    cfg: DistillConfig, student: ModelArch, teacher_ckpt: Path | None, tp: int, pp: int, ep: int
) -> bool:
    """Whether this training compiles (`distill.cpu_compile`, runtime/cpu_compat.py
    `compile_layers`): "on" refuses what it does not cover, "auto" trains eagerly there."""
    from minitron_nemo.runtime import cpu_compat

    if cfg.cpu_compile == "off" or cpu_compat.cuda_available():
        return False
    teacher = None
    if cfg.mode == "distill" and teacher_ckpt is not None and cfg.teacher_cache is None:
        teacher = ModelArch.load(teacher_ckpt / "arch.yaml")
    reason = None
    if tp > 1 or pp > 1 or ep > 1:
        reason = f"needs parallel.tp, pp and ep of 1 (got {tp}, {pp}, {ep}); dp is fine"
    elif student.is_moe or (teacher is not None and teacher.is_moe):
        reason = "covers dense models only (MoE routing makes shapes change every step)"
    elif cfg.recompute != "none":
        reason = f"compiles whole layers: it needs distill.recompute: none (got {cfg.recompute})"
    elif cpu_compat.cpp_compiler() is None:
        reason = "needs a C++ compiler for torch.compile's CPU kernels (g++, or set $CXX)"
    if reason is None:
        return True
    if cfg.cpu_compile == "on":
        raise MinitronError(f"distill.cpu_compile {reason}")
    log.info("distill.cpu_compile auto: training eagerly; it %s", reason)
    return False


def _check_tokenizers(student: Path, teacher: Path) -> None:
    """Teacher and student must share token ids: refuse different token strings."""
    s_tok, t_tok = (
        student / "tokenizer" / "tokenizer.json",
        teacher / "tokenizer" / "tokenizer.json",
    )
    if not (s_tok.is_file() and t_tok.is_file()):
        return
    s_vocab = json.loads(s_tok.read_text())["model"]["vocab"]
    t_vocab = json.loads(t_tok.read_text())["model"]["vocab"]
    if isinstance(s_vocab, dict) and isinstance(t_vocab, dict):
        shared = {tok: i for tok, i in s_vocab.items() if t_vocab.get(tok) != i}
        if shared:
            token = next(iter(shared))
            raise MinitronError(
                f"{s_tok}: tokenizer differs from the teacher's ({token!r} has id {s_vocab[token]} "
                f"vs {t_vocab.get(token)}); distillation needs the same token ids"
            )


def train(
    student_ckpt: Path,
    out: Path,
    cfg: DistillConfig,
    data: DataSpec,
    teacher_ckpt: Path | None = None,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    resume: bool = True,
    init_random: bool = False,
    sequence_parallel: bool = False,
    hooks=None,
    ep: int = 1,
) -> Path:
    """Train on the train view of `data` and return the final checkpoint directory
    (out/checkpoints/step_<steps>). `hooks` (trainer.TrainHooks) inject faults in tests."""
    from minitron_nemo.data.datasets import build_indices
    from minitron_nemo.distill.trainer import OUTCOME, train_on_rank

    check_environment(cfg)
    checkpoint.require_checkpoint(student_ckpt)
    if cfg.mode == "distill" and cfg.teacher_cache is None:
        if teacher_ckpt is None:
            raise MinitronError("distill: a teacher checkpoint is required in mode=distill")
        checkpoint.require_checkpoint(teacher_ckpt)
        _check_tokenizers(student_ckpt, teacher_ckpt)
    arch = ModelArch.load(student_ckpt / "arch.yaml")
    arch.check_parallel(tp, pp, ep if arch.is_moe else 1)
    if dp % ep:
        raise MinitronError(f"parallel.ep = {ep} must divide parallel.dp = {dp}")
    if arch.is_moe and tp > 1 and not sequence_parallel:
        raise MinitronError(
            f"{cfg.mode}: training an MoE model at tp = {tp} needs parallel.sequence_parallel "
            "(megatron's rule; it needs GPUs): set it, or train at tp = 1 with parallel.ep"
        )
    compiled = resolve_cpu_compile(cfg, arch, teacher_ckpt, tp, pp, ep)
    cfg = dataclasses.replace(cfg, cpu_compile="on" if compiled else "off")  # what runs
    if cfg.intermediate_pairs and cfg.mode == "distill":
        check_pairs(cfg.intermediate_pairs, arch, ModelArch.load(teacher_ckpt / "arch.yaml"), pp)
    # The train view for this training's length, built once before the ranks start.
    data = dataclasses.replace(data, train_samples=cfg.steps * cfg.global_batch_size)
    build_indices(data, ("train",))
    if cfg.teacher_cache is not None:
        from minitron_nemo.distill.teacher_cache import check_cache

        check_cache(Path(cfg.teacher_cache), cfg.top_k, cfg.temperature,
                    student_ckpt / "tokenizer", data, cfg.micro_batch_size)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (out / OUTCOME).unlink(missing_ok=True)
    if not resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    run_on_ranks(
        train_on_rank,
        tp * pp * dp,
        student_ckpt,
        teacher_ckpt,
        out,
        cfg,
        data,
        tp,
        pp,
        resume,
        init_random,
        sequence_parallel,
        hooks,
        ep,
        handles_stop=True,
    )
    outcome = json.loads((out / OUTCOME).read_text()) if (out / OUTCOME).is_file() else {}
    if outcome.get("outcome") == "stopped":
        raise Stopped(f"stopped at step {outcome['step']}; rerun the same command to resume")
    if outcome.get("outcome") == "nonfinite":
        steps = outcome["steps"]
        raise MinitronError(
            f"{cfg.mode}: {len(steps)} steps in a row with a non-finite loss or gradient "
            f"(steps {steps[0]}-{steps[-1]}, skipped); stopped at step {outcome['step']}. "
            f"The last good checkpoint is intact: {outcome['last_good'] or 'none yet'}"
        )
    final = out / "checkpoints" / f"step_{cfg.steps:06d}"
    if not atomic.is_complete(final):
        raise RuntimeError(f"training ended without its final checkpoint {final}")
    return final
