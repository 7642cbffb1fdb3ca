"""The distillation loop on megatron-core (also the LM-only loop: scratch baseline and teacher
correction). One function per rank; `train()` starts the ranks.

Per step: each rank reads its micro-batches of the step's global batch (samples [consumed,
consumed + global_batch) of the train split, megatron's sampler layout) from megatron's
memory-mapped datasets (data/datasets.py: ranks receive paths, never tokens); megatron's
schedule (1F1B with PP) runs teacher forward + student forward/backward per micro-batch; megatron
DDP reduces gradients; megatron's optimizer (distributed on GPU) clips and steps; the LR follows
linear warmup then cosine decay to min_lr.
Checkpoints (every `save_every` steps and at the end) are megatron dist-checkpoints of model +
optimizer, with scheduler, step and RNG beside them, written under a hidden directory and
renamed when complete: a checkpoint killed mid-save is never picked up by --resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_nemo import atomic, checkpoint
from minitron_nemo.config import DistillConfig
from minitron_nemo.data.datasets import DataSpec
from minitron_nemo.distill.losses import combine, kl_divergence, top_k_forward_kl
from minitron_nemo.distill.pair import KDPair
from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.runtime.forward import PAD_LOGIT, mask_vocab_padding, token_losses
from minitron_nemo.runtime.launch import run_on_ranks
from minitron_nemo.runtime.progress import Progress

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"step_(\d+)")


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The complete step_N directory with the highest N (incomplete ones are ignored)."""
    if not ckpt_root.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in ckpt_root.iterdir()
        if (m := STEP_DIR.fullmatch(p.name)) and atomic.is_complete(p)
    ]
    return max(found)[1] if found else None


def check_environment(cfg: DistillConfig) -> None:
    """What the config cannot know: FP8 needs TransformerEngine on a GPU."""
    if cfg.fp8 is not None:
        from minitron_nemo.models.build import te_available

        if not te_available():
            raise MinitronError(
                f"distill.fp8 = {cfg.fp8!r} needs TransformerEngine on a GPU (not available)"
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


def _loss_fn(pair: KDPair, cfg: DistillConfig, vocab: int, labels_bs: torch.Tensor, output):
    """Last stage: KD and/or LM loss of one micro-batch -> (loss, logged terms)."""
    from megatron.core import parallel_state

    student = mask_vocab_padding(output, vocab)
    logits_loss = lm = None
    if pair.teacher is not None and cfg.logits_weight > 0:
        teacher = mask_vocab_padding(pair.teacher_output, vocab)
        if teacher.shape[-1] != student.shape[-1]:
            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                raise MinitronError(
                    "teacher and student vocab paddings differ; not supported at TP > 1"
                )
            width = max(teacher.shape[-1], student.shape[-1])
            teacher, student = (
                torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=PAD_LOGIT)
                for x in (teacher, student)
            )
        s_tv = student.reshape(-1, student.shape[-1])
        t_tv = teacher.reshape(-1, teacher.shape[-1])
        if cfg.kl == "topk":
            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                raise MinitronError("distill.kl = topk is not supported at TP > 1")
            logits_loss = top_k_forward_kl(s_tv, t_tv, cfg.top_k, cfg.temperature)
        else:
            logits_loss = kl_divergence(
                s_tv,
                t_tv,
                cfg.temperature,
                cfg.kl,
                chunk_size=cfg.kd_chunk_tokens,
                group=parallel_state.get_tensor_model_parallel_group(),
            )
    if cfg.lm_weight > 0 or pair.teacher is None:
        lm = token_losses(output, labels_bs, vocab).mean()
    weights = {
        "logits": cfg.logits_weight,
        "lm": cfg.lm_weight if pair.teacher is not None else 1.0,
    }
    total, logs = combine(logits_loss, None, lm, weights, dynamic=False)
    if lm is None:  # monitor the student's LM loss anyway (comparable with the scratch run)
        with torch.no_grad():
            logs["loss_lm"] = float(token_losses(output, labels_bs, vocab).mean())
    return total, {k: torch.tensor(v, dtype=torch.double) for k, v in logs.items()}


def _save(
    step_dir: Path,
    pair_ddp,
    pair: KDPair,
    optimizer,
    scheduler,
    state: dict,
    arch: ModelArch,
    dtype: torch.dtype,
    tokenizer_dir: Path | None,
) -> None:
    """Collective: every rank writes its shard; rank 0 finalises and renames."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    tmp = atomic.incomplete_path(step_dir)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "weights").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()
    model_sd = pair.sharded_state_dict()
    sharded = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}
    dist_checkpointing.save(sharded, str(tmp / "weights"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / "rng" / f"rank{rank}.pt")
    dist.barrier()
    if os.environ.get("MINITRON_TEST_KILL_DURING_SAVE") == str(state["step"]):
        os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with a half-written checkpoint
    if rank == 0:
        checkpoint.write_meta(tmp, arch, dtype, kind="train", step=state["step"])
        (tmp / "train_state.json").write_text(
            json.dumps({**state, "scheduler": scheduler.state_dict()})
        )
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            checkpoint.copy_tokenizer(tokenizer_dir, tmp / "tokenizer")
        (tmp / atomic.DONE).write_text("ok\n")
        shutil.rmtree(step_dir, ignore_errors=True)
        tmp.rename(step_dir)
    dist.barrier()


def _load(step_dir: Path, pair: KDPair, optimizer, scheduler) -> dict:
    from megatron.core import dist_checkpointing

    model_sd = pair.sharded_state_dict()
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True),
    }
    state = dist_checkpointing.load(sharded, str(step_dir / "weights"))
    pair.module.load_state_dict(
        {k: v for k, v in state["model"].items() if not k.startswith("kd_projection.")}
    )
    if pair.projection is not None:
        pair.projection.load_state_dict(
            {
                k.removeprefix("kd_projection."): v
                for k, v in state["model"].items()
                if k.startswith("kd_projection.")
            }
        )
    optimizer.load_state_dict(state["optimizer"])
    train_state = json.loads((step_dir / "train_state.json").read_text())
    scheduler.num_steps = 0  # load_state_dict advances by the saved count from here
    scheduler.load_state_dict(train_state.pop("scheduler"))
    rng_file = step_dir / "rng" / f"rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return train_state


def _train_on_rank(
    student_ckpt: Path,
    teacher_ckpt: Path | None,
    out: Path,
    cfg: DistillConfig,
    data: DataSpec,
    tp: int,
    pp: int,
    resume: bool,
    init_random: bool,
) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import (
        OptimizerParamScheduler,
        get_canonical_lr_for_logging,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from minitron_nemo.data.datasets import step_microbatches, train_reader
    from minitron_nemo.models.build import build_model
    from minitron_nemo.runtime import cpu_compat, distributed

    with distributed.initialize(tp=tp, pp=pp, seed=cfg.seed) as ctx:
        reader = train_reader(data)
        arch = ModelArch.load(student_ckpt / "arch.yaml")
        dtype = checkpoint.checkpoint_dtype(student_ckpt)
        student = build_model(arch, dtype, perform_initialization=init_random, fp8=cfg.fp8)
        if not init_random:
            checkpoint.load_weights(student, student_ckpt / "weights")
        teacher = None
        if cfg.mode == "distill":
            teacher, _ = checkpoint.load_model(
                teacher_ckpt, fp8=cfg.fp8 if cfg.fp8_teacher else None
            )
        projection = None
        if cfg.intermediate_pairs and teacher is not None:
            torch.manual_seed(cfg.seed)
            projection = torch.nn.Linear(
                arch.hidden_size, teacher.config.hidden_size, bias=False, dtype=dtype
            )
            torch.nn.init.normal_(projection.weight, std=arch.hidden_size**-0.5)
            projection.to(ctx.device)
        pair = KDPair(
            student,
            teacher,
            projection,
            [tuple(p) for p in cfg.intermediate_pairs] if teacher is not None else None,
            cfg.intermediate_loss,
        )
        on_gpu = cpu_compat.cuda_available()
        ddp = DistributedDataParallel(
            config=student.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=on_gpu,
            ),
            module=pair,
        )
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=0.9,
                adam_beta2=cfg.adam_beta2,
                adam_eps=1e-8,
                clip_grad=cfg.clip_grad,
                bf16=dtype == torch.bfloat16,
                params_dtype=dtype,
                use_distributed_optimizer=on_gpu,
            ),
            [ddp],
        )
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=min(cfg.warmup_steps, cfg.steps),
            lr_decay_steps=cfg.steps,
            lr_decay_style=cfg.lr_decay_style,
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=cfg.steps,
            wd_incr_style="constant",
        )
        # megatron's warmup starts at init_lr = 0 for scheduler step 0; advancing once makes the
        # first optimizer step train at lr / warmup_steps instead of not at all.
        scheduler.step(increment=1)
        config = student.config
        config.no_sync_func = ddp.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        ckpt_root = out / "checkpoints"
        state = {"step": 0, "consumed_samples": 0, "alpha": cfg.intermediate_weight}
        if resume and (latest := latest_checkpoint(ckpt_root)) is not None:
            state = _load(latest, pair, optimizer, scheduler)
        dp_size, dp_rank = ctx.dp, ctx.dp_rank
        if cfg.global_batch_size % (cfg.micro_batch_size * dp_size):
            raise MinitronError(
                f"distill.global_batch_size {cfg.global_batch_size} is not a multiple of "
                f"micro_batch_size x data-parallel size = {cfg.micro_batch_size} x {dp_size}"
            )
        n_micro = cfg.global_batch_size // (cfg.micro_batch_size * dp_size)
        seq = data.seq_length
        logging_rank = ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0
        writer = None
        if logging_rank:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        tokens_per_step = cfg.global_batch_size * seq
        bar = Progress(cfg.steps, f"{cfg.mode} steps", enabled=logging_rank)
        bar.update(state["step"])
        forward_backward = get_forward_backward_func()
        kill_after = os.environ.get("MINITRON_TEST_KILL_AFTER_STEP")
        metrics_path = out / "metrics.jsonl"
        if logging_rank and metrics_path.is_file():  # resumed: forget steps after the checkpoint
            kept = [
                line
                for line in metrics_path.read_text().splitlines()
                if json.loads(line)["step"] <= state["step"]
            ]
            metrics_path.write_text("".join(line + "\n" for line in kept))
        while state["step"] < cfg.steps:
            start = time.time()
            mbs = [
                m.to(ctx.device)
                for m in step_microbatches(
                    reader,
                    state["consumed_samples"],
                    cfg.global_batch_size,
                    cfg.micro_batch_size,
                    dp_rank,
                    dp_size,
                )
            ]
            # Dynamic alpha (P1) uses the previous step's L_logits / L_intermediate: the current
            # logits loss is only known at the end of the pipeline, after the stage that adds
            # the intermediate loss to the backward pass.
            alpha = state["alpha"] if cfg.dynamic_alpha else cfg.intermediate_weight
            pair.aux_scale = alpha / n_micro
            pair.intermediate_values.clear()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()

            def step_fn(data_iterator, model):
                batch = next(data_iterator)
                output = model(batch[:, :-1])
                return output, partial(_loss_fn, pair, cfg, arch.vocab_size, batch[:, 1:])

            losses = forward_backward(
                forward_step_func=step_fn,
                data_iterator=iter(mbs),
                model=[ddp],
                num_microbatches=n_micro,
                seq_length=seq,
                micro_batch_size=cfg.micro_batch_size,
                forward_only=False,
                adjust_tensor_shapes_fn=pair.adjust_tensor_shapes
                if pp > 1 and teacher is not None
                else None,
            )
            if projection is not None and pp > 1:
                for p in projection.parameters():
                    dist.all_reduce(
                        p.main_grad, group=parallel_state.get_pipeline_model_parallel_group()
                    )
            lr = get_canonical_lr_for_logging(optimizer.param_groups)
            _ok, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            logs = _reduce_logs(losses, pair, ctx, alpha)
            if pair.pairs and logs.get("loss_intermediate", 0) > 0 and "loss_logits" in logs:
                state["alpha"] = logs["loss_logits"] / logs["loss_intermediate"]
            state["step"] += 1
            state["consumed_samples"] += cfg.global_batch_size
            elapsed = time.time() - start
            logs.update(
                lr=lr,
                grad_norm=float(grad_norm or 0.0),
                tokens_per_s=tokens_per_step / elapsed,
                step=state["step"],
            )
            if logging_rank:
                for key, value in logs.items():
                    if key != "step":
                        writer.add_scalar(f"{cfg.mode}/{key}", value, state["step"])
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(logs) + "\n")
            bar.update(1, loss=logs.get("loss", float("nan")), tok_s=logs["tokens_per_s"])
            if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
                _save(
                    ckpt_root / f"step_{state['step']:06d}",
                    ddp,
                    pair,
                    optimizer,
                    scheduler,
                    state,
                    arch,
                    dtype,
                    student_ckpt / "tokenizer",
                )
            if kill_after == str(state["step"]):
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die right after this step
        bar.close()
        if writer is not None:
            writer.close()


def _reduce_logs(losses: list[dict], pair: KDPair, ctx, alpha: float) -> dict[str, float]:
    """Mean of each logged term over micro-batches and DP ranks, known on every rank.

    `alpha` is the intermediate-loss weight this step trained with."""
    from megatron.core import parallel_state

    keys = ["loss", "loss_logits", "loss_lm", "loss_intermediate"]
    # Row 0: values, row 1: 1 where a term exists (on GPU for nccl).
    values = torch.zeros(2, len(keys), dtype=torch.double, device=ctx.device)
    if ctx.is_last_stage and losses:
        for i, key in enumerate(keys[:3]):
            if key in losses[0]:
                values[0, i] = torch.stack([m[key] for m in losses]).mean()
                values[1, i] = 1
    if pair.intermediate_values:
        values[0, 3] = sum(pair.intermediate_values) / len(pair.intermediate_values)
        values[1, 3] = 1
    if ctx.pp > 1:
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    if ctx.dp > 1:
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= ctx.dp
    logs = {k: float(values[0, i]) for i, k in enumerate(keys) if values[1, i] > 0}
    if "loss_intermediate" in logs:
        logs["alpha"] = alpha
        logs["loss"] = logs.get("loss", 0.0) + alpha * logs["loss_intermediate"]
    return logs


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
) -> Path:
    """Train on the train split of `data` and return the final checkpoint directory
    (out/checkpoints/step_<steps>)."""
    from minitron_nemo.data.datasets import build_indices

    check_environment(cfg)
    checkpoint.require_checkpoint(student_ckpt)
    if cfg.mode == "distill":
        if teacher_ckpt is None:
            raise MinitronError("distill: a teacher checkpoint is required in mode=distill")
        checkpoint.require_checkpoint(teacher_ckpt)
        _check_tokenizers(student_ckpt, teacher_ckpt)
    arch = ModelArch.load(student_ckpt / "arch.yaml")
    arch.check_parallel(tp, pp)
    if cfg.intermediate_pairs and cfg.mode == "distill":
        check_pairs(cfg.intermediate_pairs, arch, ModelArch.load(teacher_ckpt / "arch.yaml"), pp)
    # The train view for this training's length, built once before the ranks start.
    data = dataclasses.replace(data, train_samples=cfg.steps * cfg.global_batch_size)
    build_indices(data, ("train",))
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if not resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    run_on_ranks(
        _train_on_rank,
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
    )
    final = out / "checkpoints" / f"step_{cfg.steps:06d}"
    if not atomic.is_complete(final):
        raise RuntimeError(f"training ended without its final checkpoint {final}")
    return final
