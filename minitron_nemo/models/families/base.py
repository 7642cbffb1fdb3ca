"""What a family declares (name map + config translation) and the registry that finds it.

A `Rule` ties one megatron parameter to the HF tensors it is made of; `*` stands for the layer
index and `<e>` for the (global) expert index of an MoE layer. The reverse map (megatron -> HF)
is derived from the same rules, never written twice. A rule applies to every layer, or to the
dense or the MoE layers only (`layers`), so one family map serves models that mix both.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from minitron_nemo.errors import MinitronError
from minitron_nemo.models.arch import ModelArch

RuleKind = Literal["copy", "vocab", "qkv", "gate_up"]
LayerKind = Literal["all", "dense", "moe"]
EXPERT = "<e>"

# config.json entries that describe the file or the runtime, never the weights.
METADATA_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "_model_name_or_path",
        "unk_token_id",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "pretraining_tp",
        "attention_dropout",
        "tokenizer_class",
    }
)
# Metadata kept in arch.hf_extra and written back at export.
EXTRA_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "initializer_range")


@dataclass(frozen=True)
class Rule:
    """One megatron parameter <- one or more HF tensors, combined as `kind` says."""

    mcore: str
    hf: tuple[str, ...]
    kind: RuleKind = "copy"
    layers: LayerKind = "all"
    """Which decoder layers have this parameter: all, the dense-MLP ones or the MoE ones."""

    @property
    def per_layer(self) -> bool:
        return "*" in self.mcore

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.mcore

    def applies_to(self, arch: ModelArch, layer: int) -> bool:
        if self.layers == "all":
            return True
        return arch.is_moe_layer(layer) == (self.layers == "moe")

    def _fill(self, name: str, layer: int | None, expert: int | None) -> str:
        if self.per_layer:
            name = name.replace("*", str(layer))
        if self.per_expert:
            name = name.replace(EXPERT, str(expert))
        return name

    def mcore_name(self, layer: int | None, expert: int | None = None) -> str:
        return self._fill(self.mcore, layer, expert)

    def hf_names(self, layer: int | None, expert: int | None = None) -> tuple[str, ...]:
        return tuple(self._fill(n, layer, expert) for n in self.hf)


def layer_items(rules: list[Rule], arch: ModelArch, layer: int) -> list[tuple[Rule, int | None]]:
    """(rule, global expert or None) of every parameter decoder layer `layer` has."""
    items: list[tuple[Rule, int | None]] = []
    for rule in rules:
        if rule.per_layer and rule.applies_to(arch, layer):
            experts = range(arch.num_experts) if rule.per_expert else [None]
            items.extend((rule, e) for e in experts)
    return items


class Family:
    """Base of a family module: subclasses declare names, keys and the config translation."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    model_type: ClassVar[str]
    config_keys: ClassVar[frozenset[str]]
    """config.json keys this family understands besides METADATA_KEYS."""
    required_values: ClassVar[dict[str, Any]] = {}
    """config.json keys whose value must be exactly this (e.g. hidden_act = silu)."""
    ignorable_tensors: ClassVar[tuple[str, ...]] = (
        r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    )

    # -- weights -------------------------------------------------------------------------
    def rules(self, arch: ModelArch) -> list[Rule]:
        raise NotImplementedError

    def expected_hf_tensors(self, arch: ModelArch) -> list[str]:
        """Every HF tensor name a model of this architecture has, in layer order."""
        rules = self.rules(arch)
        names = [n for rule in rules if not rule.per_layer for n in rule.hf_names(None)]
        for layer in range(arch.num_layers):
            for rule, expert in layer_items(rules, arch, layer):
                names.extend(rule.hf_names(layer, expert))
        return names

    def is_ignorable(self, hf_name: str, arch: ModelArch) -> bool:
        patterns = list(self.ignorable_tensors)
        if arch.tie_embeddings:
            patterns.append(r"lm_head\.weight")  # some tied checkpoints still store the copy
        return any(re.fullmatch(p, hf_name) for p in patterns)

    # -- config --------------------------------------------------------------------------
    def check_config_keys(self, raw: dict[str, Any], source: str) -> None:
        """Refuse config entries we would silently ignore or cannot represent."""
        unknown = sorted(set(raw) - METADATA_KEYS - self.config_keys)
        if unknown:
            raise MinitronError(
                f"{source}: key(s) {unknown} are not understood by the {self.name} converter"
            )
        for key, expected in self.required_values.items():
            if key in raw and raw[key] != expected:
                raise MinitronError(
                    f"{source}: {key} = {raw[key]!r} is not supported by the {self.name} "
                    f"converter (expected {expected!r})"
                )

    def arch_from_config(self, raw: dict[str, Any], source: str) -> ModelArch:
        raise NotImplementedError

    def hf_config_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        raise NotImplementedError

    def check_exportable(self, arch: ModelArch) -> None:
        """Refuse an architecture transformers cannot load (checked before pruning to it)."""
        # transformers 5 validates hidden_size % num_attention_heads == 0 for these configs,
        # even when head_dim is given explicitly.
        if arch.hidden_size % arch.num_attention_heads:
            raise MinitronError(
                f"hidden_size {arch.hidden_size} is not a multiple of num_attention_heads "
                f"{arch.num_attention_heads}: transformers could not load the exported "
                f"{self.name} model"
            )


REGISTRY: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family findable by its name and HF architectures."""
    instance = cls()
    REGISTRY[cls.name] = instance
    return cls


def family_by_name(name: str) -> Family:
    if name not in REGISTRY:
        raise MinitronError(f"unknown family {name!r}; supported: {sorted(REGISTRY)}")
    return REGISTRY[name]


def supported_architectures() -> list[str]:
    return sorted(a for fam in REGISTRY.values() for a in fam.architectures)


def family_for_config(raw: dict[str, Any], source: str) -> Family:
    """The family whose `architectures` entry matches the config (one clear line if none)."""
    archs = raw.get("architectures") or []
    for fam in REGISTRY.values():
        if any(a in fam.architectures for a in archs):
            return fam
    raise MinitronError(
        f"{source}: architectures {archs} not supported; supported: "
        f"{', '.join(supported_architectures())}"
    )


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise MinitronError(f"{path}: not found (expected a HuggingFace model directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MinitronError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise MinitronError(f"{path}: expected a JSON object")
    return raw
