"""Model cards: the README.md (Hugging Face hub metadata + how the model was made + measured
numbers) in every exported HF directory, so it can be published as is.

`mcore_to_hf` writes a basic card with every export (architecture and parameter count); the
report stage, which knows the whole run, rewrites the cards of the run's exports (student,
scratch baseline, corrected teacher, pruned model) with the teacher, the prune targets, the
training tokens and losses, and the results table.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from minitron_nemo.models.arch import ModelArch

CARD = "README.md"
# The embedded default teacher (recipes: `teacher: smollm2`), as published on the hub.
SMOLLM2_CARD = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}


def front_matter(readme: Path) -> dict:
    """The YAML metadata block at the top of a hub README (empty when there is none)."""
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def teacher_metadata(teacher: str, hf_dir: Path | None) -> dict:
    """Name (hub id when known) and license of the teacher: the embedded SmolLM2's, or read from
    the teacher directory's README front matter and config.json (`_name_or_path`)."""
    if teacher == "smollm2":
        return dict(SMOLLM2_CARD)
    meta = front_matter(hf_dir / CARD) if hf_dir is not None else {}
    name = None
    config = hf_dir / "config.json" if hf_dir is not None else None
    if config is not None and config.is_file():
        name = json.loads(config.read_text()).get("_name_or_path") or None
    name = name or meta.get("model_name") or (hf_dir.name if hf_dir is not None else teacher)
    return {"name": str(name), "license": meta.get("license", "other")}


def render(metadata: dict, title: str, sections: list[str]) -> str:
    """A hub README: YAML metadata, a title, then the sections (markdown)."""
    meta = yaml.safe_dump({k: v for k, v in metadata.items() if v is not None}, sort_keys=False)
    return f"---\n{meta}---\n\n# {title}\n\n" + "\n\n".join(s.strip() for s in sections) + "\n"


def write_card(hf_dir: Path, text: str) -> None:
    """Write README.md into an HF directory under a temporary name, then rename it into place."""
    tmp = hf_dir / f".{CARD}.tmp"
    tmp.write_text(text)
    tmp.replace(hf_dir / CARD)


def basic_card(arch: ModelArch, source: str) -> str:
    """The card every export gets: architecture, parameter count, where it came from."""
    params = arch.num_parameters()
    active = arch.num_parameters(active=True)
    shape = (
        f"{arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_attention_heads} heads "
        f"({arch.num_query_groups} KV groups, head_dim {arch.head_dim})"
    )
    if arch.is_moe:
        shape += (
            f", {arch.num_experts} experts of width {arch.moe_ffn_hidden_size} "
            f"(top-{arch.moe_router_topk}; {active / 1e6:,.1f}M active parameters)"
        )
    else:
        shape += f", MLP {arch.ffn_hidden_size}"
    return render(
        {
            "library_name": "transformers",
            "tags": ["minitron-nemo"],
            "pipeline_tag": "text-generation",
        },  # fmt: skip
        f"{arch.family} model, {params / 1e6:,.1f}M parameters",
        [f"Exported by minitron-nemo from the megatron checkpoint `{source}`: {shape}."],
    )


def run_card(
    teacher: dict, model: str, made: list[str], table: str, run_name: str, tags: list[str]
) -> str:
    """The card of one of a run's exports: `made` says how (teacher, pruning, training), `table`
    is the run's results table (every model of the run, this one included)."""
    return render(
        {
            "base_model": teacher["name"],
            "library_name": "transformers",
            "license": teacher["license"],
            "tags": ["minitron-nemo", *tags],
            "pipeline_tag": "text-generation",
        },
        f"{run_name}: {model}",
        [
            "## How it was made\n\n" + "\n".join(f"- {line}" for line in made),
            "## Measured in the run\n\nHeld-out loss on the run's test split (documents never "
            "trained on) and zero-shot benchmarks (lm-evaluation-harness) of every model of "
            f"the run; this card's model is the row **{model}**.\n\n" + table,
            f"Made with minitron-nemo (`minitron run`); the teacher's license "
            f"({teacher['license']}) applies.",
        ],
    )
