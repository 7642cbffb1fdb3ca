"""The training loop of one rank: distillation, or the LM loss alone (scratch baseline, teacher
correction). `train.py` starts the ranks; this module is what each runs.

    Trainer.__init__   models (student, frozen teacher, projection) -> megatron DDP, optimizer,
                       warmup + cosine scheduler; resume from the latest complete checkpoint
    Trainer.step       this rank's micro-batches of the step -> megatron's schedule (1F1B with
                       PP) -> gradient norm -> skip the update if it is not finite -> optimizer
    Trainer.run        steps until done, a stop signal (save, then exit), or too many
                       non-finite steps in a row (stop without saving); metrics every log_every
                       steps; checkpoints every save_every steps and at the end

Tests inject faults through `TrainHooks` (functions handed in by the caller); the loop reads no
environment variables.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_nemo import checkpoint
from minitron_nemo.config import DistillConfig
from minitron_nemo.data.datasets import DataSpec, step_sample_indices, train_reader
from minitron_nemo.distill.checkpoints import (
    CheckpointManager,
    async_save_available,
    latest_checkpoint,
)
from minitron_nemo.distill.monitor import TrainMonitor, forward_flops_per_token, peak_flops
from minitron_nemo.distill.pair import KDPair, output_weight
from minitron_nemo.distill.topk_loss import TeacherTopK
from minitron_nemo.distill.vocab_loss import chunked_vocab_losses
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.runtime import cpu_compat
from minitron_nemo.runtime.preemption import StopRequest


def get_canonical_lr_for_logging(param_groups):
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging as lr_of

    return lr_of(param_groups)


OUTCOME = "outcome.json"
"""Written by rank 0 when the loop ends: done, stopped (signal) or nonfinite."""


@dataclass
class TrainHooks:
    """Fault injection for tests; every hook defaults to nothing (module-level functions, so
    they reach the ranks by pickle)."""

    after_step: Callable[[int], None] | None = None
    """Called with the step number after each step (and its save)."""
    during_save: Callable[[int], None] | None = None
    """Called after a checkpoint's shards are written, before it is finalised."""
    poison_grads: Callable[[int], bool] | None = None
    """True for a step: its gradients are overwritten with NaN before the update."""


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    alpha: float = 1.0
    skipped_steps: int = 0

    def record(self) -> dict:
        return dataclasses.asdict(self)


class Trainer:
    """One rank's training (see the module docstring)."""

    def __init__(
        self,
        ctx,
        student_ckpt: Path,
        teacher_ckpt: Path | None,
        out: Path,
        cfg: DistillConfig,
        data: DataSpec,
        init_random: bool,
        resume: bool,
        sequence_parallel: bool = False,
        hooks: TrainHooks | None = None,
    ) -> None:
        self.ctx, self.cfg, self.data, self.out = ctx, cfg, data, out
        self.hooks = hooks or TrainHooks()
        self.sequence_parallel = sequence_parallel
        self.reader = train_reader(data)
        self.arch = ModelArch.load(student_ckpt / "arch.yaml")
        self.dtype = checkpoint.checkpoint_dtype(student_ckpt)
        self._build_models(student_ckpt, teacher_ckpt, init_random)
        self._build_optimizer()
        self.ckpts = CheckpointManager(
            out / "checkpoints",
            self.arch,
            self.dtype,
            student_ckpt / "tokenizer",
            keep_last=cfg.keep_last,
            keep_every=cfg.keep_every,
            async_save=async_save_available() if cfg.async_save is None else cfg.async_save,
            extra_params=sum(p.numel() for p in self.projection.parameters())
            if self.projection is not None
            else 0,
        )
        self.ckpts.clean_incomplete()
        self.state = TrainState(alpha=cfg.intermediate_weight)
        if resume and (latest := latest_checkpoint(self.ckpts.root)) is not None:
            self._load(latest)
        cpu_compat.allocate_optimizer_state(self.optimizer)  # (a resumed state is kept)
        self.alpha = torch.tensor(self.state.alpha, dtype=torch.float64, device=ctx.device)
        self.n_micro = cfg.global_batch_size // (cfg.micro_batch_size * ctx.dp)
        self.monitor = self._build_monitor()

    # -- setup -------------------------------------------------------------------------
    def _build_models(self, student_ckpt: Path, teacher_ckpt: Path | None, init_random: bool):
        from minitron_nemo.models.build import build_model

        cfg = self.cfg
        # Resolved to "on" / "off" before the ranks started (train.resolve_cpu_compile).
        self.compiled = cfg.cpu_compile == "on" and not cpu_compat.cuda_available()
        model_kwargs = dict(
            use_te=cfg.transformer_engine,
            sequence_parallel=self.sequence_parallel,
            recompute=cfg.recompute,
        )
        self.student = build_model(
            self.arch,
            self.dtype,
            perform_initialization=init_random,
            fp8=cfg.fp8,
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
            wgrad_into_main_grad=not self.compiled,  # see cpu_compat.compile_layers
            **model_kwargs,
        )
        if not init_random:
            checkpoint.load_weights(self.student, student_ckpt / "weights")
        self.teacher = None
        self.cache = None
        if cfg.teacher_cache is not None:  # the teacher's top K, read instead of running it
            from minitron_nemo.distill.teacher_cache import TeacherCache

            self.cache = TeacherCache(Path(cfg.teacher_cache))
        elif cfg.mode == "distill":
            t_arch = self.teacher_arch = ModelArch.load(teacher_ckpt / "arch.yaml")
            self.teacher = build_model(
                t_arch,
                checkpoint.checkpoint_dtype(teacher_ckpt),
                fp8=cfg.fp8 if cfg.fp8_teacher else None,
                use_te=cfg.transformer_engine,
                sequence_parallel=self.sequence_parallel,
            )
            checkpoint.load_weights(self.teacher, teacher_ckpt / "weights")
        if self.compiled:
            for model in (self.student, self.teacher):
                if model is not None:
                    cpu_compat.compile_layers(model)
        self.projection = None
        if cfg.intermediate_pairs and self.teacher is not None:
            torch.manual_seed(cfg.seed)
            self.projection = torch.nn.Linear(
                self.arch.hidden_size, self.teacher.config.hidden_size, bias=False, dtype=self.dtype
            )
            torch.nn.init.normal_(self.projection.weight, std=self.arch.hidden_size**-0.5)
            self.projection.to(self.ctx.device)
        self.pair = KDPair(
            self.student,
            self.teacher,
            self.projection,
            [tuple(p) for p in cfg.intermediate_pairs] if self.teacher is not None else None,
            cfg.intermediate_loss,
        )

    def _build_optimizer(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        on_gpu = self.ctx.device.type == "cuda"
        distributed = on_gpu if cfg.distributed_optimizer is None else cfg.distributed_optimizer
        self.ddp = DistributedDataParallel(
            config=self.student.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=cfg.overlap_grad_reduce,
                overlap_param_gather=cfg.overlap_param_gather,
                use_distributed_optimizer=distributed,
            ),
            module=self.pair,
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=0.9,
                adam_beta2=cfg.adam_beta2,
                adam_eps=1e-8,
                clip_grad=cfg.clip_grad,
                bf16=self.dtype == torch.bfloat16,
                params_dtype=self.dtype,
                use_distributed_optimizer=distributed,
                overlap_param_gather=cfg.overlap_param_gather,
            ),
            [self.ddp],
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            # megatron wants warmup < decay steps: a warmup as long as the run is clamped.
            lr_warmup_steps=min(cfg.warmup_steps, cfg.steps - 1),
            lr_decay_steps=cfg.steps,
            lr_decay_style=cfg.lr_decay_style,
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=cfg.steps,
            wd_incr_style="constant",
        )
        # megatron's warmup starts at init_lr = 0 for scheduler step 0; advancing once makes the
        # first optimizer step train at lr / warmup_steps instead of not at all.
        self.scheduler.step(increment=1)
        config = self.student.config
        config.no_sync_func = self.ddp.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        if cfg.overlap_grad_reduce:
            config.grad_sync_func = self.ddp.start_grad_sync
        if cfg.overlap_param_gather:
            config.param_sync_func = self.ddp.start_param_sync

    def _build_monitor(self) -> TrainMonitor:
        from megatron.core import parallel_state

        ctx, cfg = self.ctx, self.cfg
        flops = 3 * forward_flops_per_token(self.arch, self.data.seq_length)
        if self.teacher is not None:
            flops += forward_flops_per_token(self.teacher_arch, self.data.seq_length)
        return TrainMonitor(
            self.out,
            cfg.mode,
            cfg.steps,
            self.state.step,
            cfg.log_every,
            logging_rank=ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0,
            device=ctx.device,
            flops_per_token=flops,
            peak=peak_flops(self.dtype, cfg.peak_tflops),
            world_size=ctx.world_size,
            groups=[
                parallel_state.get_pipeline_model_parallel_group() if ctx.pp > 1 else None,
                parallel_state.get_data_parallel_group() if ctx.dp > 1 else None,
            ],
        )

    # -- checkpoints -------------------------------------------------------------------
    def _sharded_state(self, loading: bool = False) -> dict:
        model_sd = self.pair.sharded_state_dict()
        return {
            "model": model_sd,
            "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=loading),
        }

    def _load(self, step_dir: Path) -> None:
        def load_into(state: dict) -> None:
            model = state["model"]
            self.pair.module.load_state_dict(
                {k: v for k, v in model.items() if not k.startswith("kd_projection.")}
            )
            if self.projection is not None:
                self.projection.load_state_dict(
                    {
                        k.removeprefix("kd_projection."): v
                        for k, v in model.items()
                        if k.startswith("kd_projection.")
                    }
                )
            self.optimizer.load_state_dict(state["optimizer"])

        record = CheckpointManager.load(step_dir, self._sharded_state(loading=True), load_into)
        self.scheduler.num_steps = 0  # load_state_dict advances by the saved count from here
        self.scheduler.load_state_dict(record.pop("scheduler"))
        fields = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in record.items() if k in fields})

    def _save(self) -> None:
        self.state.alpha = float(self.alpha)
        self.ckpts.save(
            self.state.step,
            self._sharded_state(),
            self.state.record(),
            self.scheduler.state_dict(),
            during_save=self.hooks.during_save,
        )

    # -- one step ----------------------------------------------------------------------
    def _loss(self, labels_bs: torch.Tensor, cached: TeacherTopK | None, hidden_sbh: torch.Tensor):
        """Last stage: the micro-batch's loss from both models' final hidden states (or the
        student's and the teacher's cached top K, [b, s, K])."""
        from megatron.core import parallel_state, tensor_parallel

        cfg, pair = self.cfg, self.pair
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        teacher_sbh = pair.teacher_output
        if self.sequence_parallel:  # sequence-sharded hidden states: gather them first
            hidden_sbh = tensor_parallel.gather_from_sequence_parallel_region(hidden_sbh)
            if teacher_sbh is not None:
                teacher_sbh = tensor_parallel.gather_from_sequence_parallel_region(teacher_sbh)
        elif tp > 1:  # the output layer is column-parallel: all-reduce d(hidden) in backward
            hidden_sbh = tensor_parallel.copy_to_tensor_model_parallel_region(hidden_sbh)
        h_s = hidden_sbh.reshape(-1, hidden_sbh.shape[-1])  # tokens in [s, b] order
        h_t = None if teacher_sbh is None else teacher_sbh.reshape(-1, teacher_sbh.shape[-1])
        labels_t = labels_bs.t().reshape(-1)
        w_s = output_weight(self.student)
        w_t = output_weight(self.teacher) if self.teacher is not None else None
        vocab_start = parallel_state.get_tensor_model_parallel_rank() * w_s.shape[0]
        has_teacher = self.teacher is not None or self.cache is not None
        distill = has_teacher and cfg.logits_weight > 0
        lm_weight = cfg.lm_weight if has_teacher else 1.0
        if cached is not None:  # [b, s, ...] -> tokens in [s, b] order, like the hidden states
            cached = TeacherTopK(*(x.transpose(0, 1).flatten(0, 1) for x in cached))
        kl_t, nll_t = chunked_vocab_losses(
            h_s,
            h_t if distill else None,
            labels_t,
            w_s,
            w_t,
            self.arch.vocab_size,
            vocab_start,
            cfg.temperature,
            cfg.kl if distill else "forward",  # (no KL without a teacher)
            nll_grad=lm_weight > 0,
            chunk_tokens=cfg.kd_chunk_tokens,
            group=tp_group,
            top_k=cfg.top_k,
            cached=cached if distill else None,
            compiled=self.compiled,
        )
        terms: dict[str, torch.Tensor] = {"loss_lm": nll_t.mean()}
        total = lm_weight * terms["loss_lm"] if lm_weight > 0 else None
        if distill:
            kl = kl_t.mean() * cfg.temperature**2
            terms["loss_logits"] = kl
            total = cfg.logits_weight * kl if total is None else total + cfg.logits_weight * kl
        terms["loss"] = total
        # Copies: megatron's schedule divides the returned loss by the micro-batch count in place.
        return total, {k: v.detach().clone() for k, v in terms.items()}

    def _intermediate_step(self, losses: list[dict], update_alpha: bool) -> torch.Tensor:
        """The step's intermediate loss: each stage's mean over its micro-batches (the pairs it
        holds), summed over stages, averaged over data-parallel ranks. With dynamic alpha, P1's
        alpha = L_logits / L_intermediate of this step, used by the next step (the logits loss
        is only known on the last stage, after the intermediate loss entered the backward pass).
        On the device: one all-reduce, no host sync."""
        stats = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)
        if losses and "loss_logits" in losses[0]:
            stats[0] = torch.stack([m["loss_logits"] for m in losses]).double().mean()
            stats[1] = 1
        if self.pair.intermediate_values:
            stats[2] = torch.stack(self.pair.intermediate_values).double().mean()
        if dist.get_world_size() > 1:
            dist.all_reduce(stats)
        replicas = self.ctx.tp * self.ctx.dp  # every stage's value counted by each TP x DP rank
        intermediate = stats[2] / replicas
        if update_alpha:
            ratio = (stats[0] / replicas) / intermediate.clamp_min(1e-12)
            self.alpha = torch.where(stats[1] > 0, ratio, self.alpha)
        return intermediate

    def _moe_aux_loss(self) -> torch.Tensor:
        """The student's router load-balancing loss of this step, unweighted, mean over its
        MoE layers and micro-batches (megatron's routers record it per layer; the pipeline
        stages' layers are summed), read from megatron's MoE metrics tracker and cleared."""
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        tracker = get_moe_metrics_tracker()
        entry = tracker.metrics.get("load_balancing_loss")
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        if entry is not None:
            total += entry.values.double().sum().to(self.ctx.device)
        if self.ctx.pp > 1:
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        tracker.clear()
        n_moe = sum(self.arch.moe_layer_pattern())
        return (total / (n_moe * self.n_micro)).float()

    def _grads_finite(self) -> bool:
        """Every gradient finite on every rank (megatron's fp32 / bf16 optimizer does not check:
        a NaN would reach the weights). A sum is NaN / Inf iff an element is (gradients are far
        below fp32's overflow): one read of DDP's gradient buckets, no temporaries (isfinite
        would take four passes), one all-reduce."""
        ok = torch.ones(1, device=self.ctx.device)
        for buffer in self.ddp.buffers + self.ddp.expert_parallel_buffers:
            for bucket in buffer.buckets:
                ok = ok * torch.isfinite(bucket.grad_data.sum(dtype=torch.float32))
        if dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def step(self) -> dict:
        """One optimizer step; returns its terms (device scalars), timings and whether the
        update was skipped."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg, ctx = self.cfg, self.ctx
        start = time.perf_counter()
        mbs = []
        for idx in step_sample_indices(
            self.state.consumed_samples,
            cfg.global_batch_size,
            cfg.micro_batch_size,
            ctx.dp_rank,
            ctx.dp,
        ):
            batch = self.reader.read(idx)
            cached = None
            if self.cache is not None and ctx.is_last_stage:
                self.cache.check_batch(idx, batch)
                cached = TeacherTopK(*(x.to(ctx.device) for x in self.cache.read(idx)))
            mbs.append((batch.to(ctx.device), cached))
        data_time = time.perf_counter() - start
        dynamic = cfg.dynamic_alpha and self.pair.pairs
        alpha = self.alpha if dynamic else cfg.intermediate_weight
        self.pair.aux_scale = alpha / self.n_micro
        self.pair.intermediate_values.clear()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

        def forward_step(data_iterator, model):
            batch, cached = next(data_iterator)
            return model(batch[:, :-1]), partial(self._loss, batch[:, 1:], cached)

        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(mbs),
            model=[self.ddp],
            num_microbatches=self.n_micro,
            seq_length=self.data.seq_length,
            micro_batch_size=cfg.micro_batch_size,
            forward_only=False,
            adjust_tensor_shapes_fn=self.pair.adjust_tensor_shapes
            if ctx.pp > 1 and self.teacher is not None
            else None,
        )
        if self.projection is not None and ctx.pp > 1:
            from megatron.core import parallel_state

            for p in self.projection.parameters():
                dist.all_reduce(
                    p.main_grad, group=parallel_state.get_pipeline_model_parallel_group()
                )
        if self.hooks.poison_grads is not None and self.hooks.poison_grads(self.state.step + 1):
            for p in self.ddp.parameters():
                if p.requires_grad:
                    p.main_grad.fill_(float("nan"))
        lr = get_canonical_lr_for_logging(self.optimizer.param_groups)
        skipped = not self._grads_finite()
        grad_norm = float("nan")
        if skipped:  # the weights, the optimizer state and the LR schedule stay as they were
            self.optimizer.zero_grad()
        else:
            _ok, norm, _ = self.optimizer.step()
            grad_norm = float(norm or 0.0)
            self.scheduler.step(increment=1)
        terms = {}
        if losses:
            terms = {k: torch.stack([m[k] for m in losses]).mean() for k in losses[0]}
        if self.arch.is_moe and cfg.moe_aux_loss_coeff:
            terms["loss_moe_aux"] = self._moe_aux_loss()
        if self.pair.pairs:
            terms["loss_intermediate"] = self._intermediate_step(losses, update_alpha=dynamic)
        self.last_alpha = alpha
        self.state.step += 1
        self.state.consumed_samples += cfg.global_batch_size
        self.state.skipped_steps += int(skipped)
        return {
            "terms": terms,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": skipped,
            "data_time": data_time,
            "step_time": time.perf_counter() - start,
        }

    # -- the loop ----------------------------------------------------------------------
    def run(self, stop: StopRequest) -> dict:
        """Train to `cfg.steps`; returns the outcome (also written to OUTCOME by rank 0)."""
        cfg = self.cfg
        tokens = cfg.global_batch_size * self.data.seq_length
        outcome = {"outcome": "done"}
        in_a_row = 0
        nonfinite: list[int] = []
        try:
            while self.state.step < cfg.steps:  # (see the module docstring)
                result = self.step()
                step = self.state.step
                in_a_row = in_a_row + 1 if result["skipped"] else 0
                if result["skipped"]:
                    nonfinite.append(step)
                stopping = stop.agreed(self.ctx.device)
                last = step == cfg.steps
                self.monitor.add(
                    result["terms"],
                    tokens,
                    result["step_time"],
                    result["data_time"],
                    result["skipped"],
                )
                if self.monitor.due(step, last or stopping) or in_a_row >= cfg.max_nonfinite_steps:
                    alpha = float(self.last_alpha) if self.pair.pairs else None
                    self.monitor.log(step, result["lr"], result["grad_norm"], alpha)
                if in_a_row >= cfg.max_nonfinite_steps:
                    latest = latest_checkpoint(self.ckpts.root)
                    outcome = {
                        "outcome": "nonfinite",
                        "step": step,
                        "steps": nonfinite[-in_a_row:],
                        "last_good": str(latest) if latest else None,
                    }
                    break  # no save: the last good checkpoint stays the newest
                self.ckpts.poll()
                if step % cfg.save_every == 0 or last or stopping:
                    self._save()
                if self.hooks.after_step is not None:
                    self.hooks.after_step(step)
                if stopping and not last:
                    outcome = {"outcome": "stopped", "step": step, "signal": stop.received}
                    break
            self.ckpts.close()  # collective: only on the normal path (peers may be gone)
        finally:
            self.monitor.close()
        outcome["skipped_steps"] = self.state.skipped_steps
        if self.ctx.rank == 0:
            (self.out / OUTCOME).write_text(json.dumps(outcome))
        return outcome


def train_on_rank(
    student_ckpt: Path,
    teacher_ckpt: Path | None,
    out: Path,
    cfg: DistillConfig,
    data: DataSpec,
    tp: int,
    pp: int,
    resume: bool,
    init_random: bool,
    sequence_parallel: bool = False,
    hooks: TrainHooks | None = None,
    ep: int = 1,
) -> None:
    from minitron_nemo.runtime import cpu_compat, distributed

    with (
        StopRequest() as stop,
        distributed.initialize(tp=tp, pp=pp, seed=cfg.seed, ep=ep) as ctx,
    ):
        cpu_compat.keep_freed_memory()  # the same large blocks are freed and reused every step
        trainer = Trainer(
            ctx,
            student_ckpt,
            teacher_ckpt,
            out,
            cfg,
            data,
            init_random,
            resume,
            sequence_parallel,
            hooks,
        )
        trainer.run(stop)
