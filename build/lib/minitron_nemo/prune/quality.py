"""Post-prune quality without retraining: importance vs random vs magnitude (width) and block
vs per-layer selection (depth), each scored by held-out LM loss of the sliced HF model.

Used by `bench/prune_quality.py` and by the slow SmolLM2 test.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minitron_nemo.eval.lm import heldout_loss
from minitron_nemo.models.arch import ModelArch
from minitron_nemo.prune import depth
from minitron_nemo.prune.baselines import magnitude_scores, random_scores
from minitron_nemo.prune.plan import Targets, target_arch
from minitron_nemo.prune.select import select
from minitron_nemo.prune.slice import slice_state_dict

LEE_SPLIT = "90,0,10"
"""Document split of the Lee corpus in studies and the default recipe: 10% of its 300
documents (~7.5k tokens) give ~58 held-out samples of 129 tokens."""


def hf_model_from_state(arch: ModelArch, state: dict[str, torch.Tensor]):
    from transformers import AutoConfig, AutoModelForCausalLM

    from minitron_nemo.models.families import family_by_name

    family = family_by_name(arch.family)
    config = AutoConfig.for_model(family.model_type, **family.hf_config_kwargs(arch))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"state does not fit: missing {missing}, unexpected {unexpected}")
    if arch.tie_embeddings:
        model.tie_weights()
    return model


def width_quality(
    state: dict[str, torch.Tensor],
    source: ModelArch,
    importance: dict,
    targets: Targets,
    heldout: torch.Tensor,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out LM loss of the width-pruned model for three ways of ranking units."""
    arch = target_arch(source, targets)
    layers = list(range(source.num_layers))
    rankings = {
        "importance": importance,
        "random": random_scores(source, seed),
        "magnitude": magnitude_scores(state, source),
    }
    out = {}
    for name, scores in rankings.items():
        plan = select(source, arch, scores["heads"], scores["neurons"], scores["channels"], layers)
        model = hf_model_from_state(arch, slice_state_dict(state, source, plan))
        out[name] = heldout_loss(model, heldout.split(4))
    return out


def depth_quality(
    state: dict[str, torch.Tensor],
    source: ModelArch,
    importance: dict,
    drop: int,
    heldout: torch.Tensor,
) -> dict[str, dict]:
    """Held-out LM loss after dropping `drop` layers chosen three ways (no retraining)."""
    choices = {
        "block (LM loss)": depth.best_block(importance["block_loss"][drop], drop),
        "per-layer (LM loss)": depth.least_important(
            [float(x) for x in importance["layer_skip_loss"]], drop
        ),
        "per-layer (block importance)": depth.least_important(
            [float(x) for x in importance["block_importance"]], drop
        ),
    }
    arch = source.replace(num_layers=source.num_layers - drop)
    out = {}
    for name, dropped in choices.items():
        layers = [i for i in range(source.num_layers) if i not in set(dropped)]
        plan = select(
            source, arch, importance["heads"], importance["neurons"], importance["channels"], layers
        )
        model = hf_model_from_state(arch, slice_state_dict(state, source, plan))
        out[name] = {"dropped": dropped, "loss": heldout_loss(model, heldout.split(4))}
    return out


def load_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(path))
    return state


def smollm2_prune_quality(
    calib: int = 48, heldout: int = 24, seq: int = 128, drop: int = 8, depth_samples: int = 4
) -> dict:
    """Calibrate SmolLM2-135M on gensim's Lee news corpus (via the prune stage, with depth
    scores), then score width and depth choices by held-out LM loss."""
    import tempfile
    import time

    from minitron_nemo.config import DataConfig, PruneConfig
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
        "width": width_quality(
            state, source, imp, PruneConfig(hidden_size=432, ffn_hidden_size=768), held
        ),
        "depth": depth_quality(state, source, imp, drop, held),
        "calibration_tokens_per_s": (calib - depth_samples) * seq / imp["calibration_seconds"],
        "prune_stage_seconds": seconds,
        "block_importance": [float(x) for x in imp["block_importance"]],
        "layer_skip_loss": [float(x) for x in imp["layer_skip_loss"]],
        "base_loss": imp["base_loss"],
    }
