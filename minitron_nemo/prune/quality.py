"""Post-prune quality without retraining, one axis at a time: importance vs random (mean of
several seeds) vs weight magnitude for hidden, ffn and heads (plus P1's activation head score),
the default's combined width target, and every depth method against random and magnitude layer
choices; each scored by the held-out LM loss of the sliced HF model.

Used by `bench/prune_quality.py` and by the slow SmolLM2 test.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minitron_nemo.config import PruneConfig
from minitron_nemo.eval.lm import heldout_loss
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.prune import depth
from minitron_nemo.prune.baselines import magnitude_scores, random_scores
from minitron_nemo.prune.plan import target_arch
from minitron_nemo.prune.select import select
from minitron_nemo.prune.slice import slice_state_dict

LEE_SPLIT = "90,0,10"
"""Document split of the Lee corpus in studies and the default recipe: 10% of its 300
documents (~7.5k tokens) give ~58 held-out samples of 129 tokens."""


def hf_model_from_state(arch: ModelArch, state: dict[str, torch.Tensor]):
    """An HF model of `arch` holding `state` (every weight; lm_head only when tied). Built
    without transformers' random initialisation, which would be overwritten anyway and took
    ~0.9 s of each ~3 s scored choice of SmolLM2-135M on 2 cores."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # transformers 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4 (setup.py allows >= 4.56)
        from transformers.modeling_utils import no_init_weights

    from minitron_nemo.models.families import family_by_name

    family = family_by_name(arch.family)
    config = AutoConfig.for_model(family.model_type, **family.hf_config_kwargs(arch))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    may_miss = ["lm_head.weight"] if arch.tie_embeddings else []
    if unexpected or [m for m in missing if m not in may_miss]:
        raise RuntimeError(f"state does not fit: missing {missing}, unexpected {unexpected}")
    if arch.tie_embeddings:
        model.tie_weights()
    return model


WIDTH_TARGETS: dict[str, dict[str, int]] = {
    "hidden 576->432": {"hidden_size": 432},
    "ffn 1536->768": {"ffn_hidden_size": 768},
    "heads 9->6 (2 of 3 per group)": {"num_attention_heads": 6},
    "hidden 432 + ffn 768 (default)": {"hidden_size": 432, "ffn_hidden_size": 768},
}
"""Width targets of SmolLM2-135M scored one axis at a time, then the default's combination."""


def _width_loss(state, source: ModelArch, arch: ModelArch, scores: dict, heldout) -> float:
    layers = list(range(source.num_layers))
    plan = select(source, arch, scores["heads"], scores["neurons"], scores["channels"], layers)
    model = hf_model_from_state(arch, slice_state_dict(state, source, plan))
    return heldout_loss(model, heldout.split(4))


def width_quality(
    state: dict[str, torch.Tensor],
    source: ModelArch,
    importance: dict,
    sizes: dict[str, int],
    heldout: torch.Tensor,
    seeds: int = 5,
) -> dict:
    """Held-out LM loss of one width target with units ranked by importance, by weight
    magnitude and at random (mean and each of `seeds` seeds); for heads, also by P1's activation
    score."""
    arch = target_arch(source, PruneConfig(**sizes))
    out: dict = {
        "importance": _width_loss(state, source, arch, importance, heldout),
        "magnitude": _width_loss(state, source, arch, magnitude_scores(state, source), heldout),
    }
    randoms = [_width_loss(state, source, arch, random_scores(source, s), heldout)
               for s in range(seeds)]  # fmt: skip
    out["random"], out["random_seeds"] = sum(randoms) / seeds, randoms
    activation = importance.get("heads_activation")
    if "num_attention_heads" in sizes and activation is not None:
        scores = {**importance, "heads": activation}
        out["activation (P1 head score)"] = _width_loss(state, source, arch, scores, heldout)
    return out


def _depth_loss(state, source: ModelArch, importance: dict, dropped: list[int], heldout) -> float:
    arch = source.replace(num_layers=source.num_layers - len(dropped))
    layers = [i for i in range(source.num_layers) if i not in set(dropped)]
    plan = select(
        source, arch, importance["heads"], importance["neurons"], importance["channels"], layers
    )
    return heldout_loss(hf_model_from_state(arch, slice_state_dict(state, source, plan)),
                        heldout.split(4))  # fmt: skip


def layer_magnitudes(state: dict[str, torch.Tensor], source: ModelArch) -> list[float]:
    """L2 norm of all of a layer's weights (the depth magnitude baseline)."""
    return [
        sum(v.double().pow(2).sum().item() for k, v in state.items()
            if k.startswith(f"model.layers.{i}.")) ** 0.5
        for i in range(source.num_layers)
    ]  # fmt: skip


def depth_quality(
    state: dict[str, torch.Tensor],
    source: ModelArch,
    importance: dict,
    drop: int,
    heldout: torch.Tensor,
    seeds: int = 5,
) -> dict:
    """Held-out LM loss after dropping `drop` layers chosen by each depth method, by weight
    magnitude and at random (mean of `seeds` seeds); no retraining."""
    choices = {
        "block (LM loss)": depth.best_block(importance["block_loss"][drop], drop),
        "per-layer (LM loss)": depth.least_important(
            [float(x) for x in importance["layer_skip_loss"]], drop
        ),
        "per-layer (block importance)": depth.least_important(
            [float(x) for x in importance["block_importance"]], drop
        ),
        "magnitude": depth.least_important(layer_magnitudes(state, source), drop),
    }
    out: dict = {
        name: {"dropped": dropped, "loss": _depth_loss(state, source, importance, dropped, heldout)}
        for name, dropped in choices.items()
    }
    randoms = []
    for s in range(seeds):
        gen = torch.Generator().manual_seed(s)
        dropped = sorted(torch.randperm(source.num_layers, generator=gen)[:drop].tolist())
        randoms.append(_depth_loss(state, source, importance, dropped, heldout))
    out["random"] = {"loss": sum(randoms) / seeds, "seeds": randoms}
    return out


def quality_table(results: dict) -> str:
    """Markdown: one row per axis, held-out loss right after pruning (lower is better)."""
    rows = [
        f"Teacher: {results['teacher_loss']:.3f}. Held-out LM loss right after pruning, no "
        f"retraining; random = mean of {results['seeds']} seeds.",
        "",
        "| target | importance (ours) | random (mean) | weight magnitude |",
        "|---|---|---|---|",
    ]
    for name, r in results["width"].items():
        extra = r.get("activation (P1 head score)")
        ours = (
            f"**{r['importance']:.3f}** (taylor)"
            if extra is not None
            else f"**{r['importance']:.3f}**"
        )
        rows.append(f"| {name} | {ours} | {r['random']:.3f} | {r['magnitude']:.3f} |")
        if extra is not None:
            rows.append(f"| {name}, P1 activation head score | {extra:.3f} | | |")
    d = results["depth"]
    for method in ("block (LM loss)", "per-layer (LM loss)", "per-layer (block importance)"):
        rows.append(
            f"| drop {results['drop']} layers, {method} | **{d[method]['loss']:.3f}** | "
            f"{d['random']['loss']:.3f} | {d['magnitude']['loss']:.3f} |"
        )
    return "\n".join(rows)


def load_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(path))
    return state


def smollm2_prune_quality(
    calib: int = 48,
    heldout: int = 24,
    seq: int = 128,
    drop: int = 8,
    depth_samples: int = 4,
    seeds: int = 5,
) -> dict:
    """Calibrate SmolLM2-135M on gensim's Lee news corpus (via the prune stage, with depth
    scores), then score width and depth choices by held-out LM loss."""
    import tempfile
    import time

    from minitron_nemo.config import DataConfig
    from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
    from minitron_nemo.data.datasets import heldout_indices, heldout_reader
    from minitron_nemo.data.sources import smollm2_hf_dir
    from minitron_nemo.data.stage import prepare_data
    from minitron_nemo.eval.lm import load_hf_model
    from minitron_nemo.models.families import family_for_config
    from minitron_nemo.models.families.base import read_config
    from minitron_nemo.prune.stage import run_prune

    hf_dir = smollm2_hf_dir()
    raw = read_config(hf_dir)
    source = family_for_config(raw, "config.json").arch_from_config(raw, "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = DataConfig(
            source="gensim:lee_background",
            split=LEE_SPLIT,
            seq_length=seq,
            calibration_samples=calib,
            heldout_samples=heldout,
        )
        spec = prepare_data(data, hf_dir, tmp_path / "data", source.vocab_size)
        held = heldout_reader(spec).read(heldout_indices(spec))
        hf_to_mcore(hf_dir, tmp_path / "mc")
        cfg = PruneConfig(
            num_layers=source.num_layers - drop,
            depth_method="block",
            depth_scores=True,
            depth_eval_samples=depth_samples,
            micro_batch_size=4,
        )
        start = time.time()
        run_prune(tmp_path / "mc", tmp_path / "prune", cfg, spec)
        seconds = time.time() - start
        imp = torch.load(tmp_path / "prune" / "importance.pt", weights_only=False)
    state = load_hf_state(hf_dir)
    return {
        "teacher_loss": heldout_loss(load_hf_model(hf_dir), held.split(4)),
        "seeds": seeds,
        "drop": drop,
        "head_score": imp["head_score"],
        "width": {
            name: width_quality(state, source, imp, sizes, held, seeds)
            for name, sizes in WIDTH_TARGETS.items()
        },
        "depth": depth_quality(state, source, imp, drop, held, seeds),
        "calibration_tokens_per_s": (calib - depth_samples) * seq / imp["calibration_seconds"],
        "prune_stage_seconds": seconds,
        "block_importance": [float(x) for x in imp["block_importance"]],
        "layer_skip_loss": [float(x) for x in imp["layer_skip_loss"]],
        "base_loss": imp["base_loss"],
    }
