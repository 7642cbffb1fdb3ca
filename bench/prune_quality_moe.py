"""MoE pruning quality without retraining, on an MoE trained here (random MoE weights cannot rank
experts): post-prune held-out loss per target and expert score, against random choices.

1. A small Qwen2-MoE (4 layers, hidden 128, 8 experts of width 128, top-2, a shared expert of
   width 256, vocab 4096 BPE trained on the corpus) is trained from scratch with our own trainer
   (LM loss) on gensim's Lee news corpus and Wikipedia sample; the held-out split (5% of the
   documents, never trained on) is also scored by a unigram model of the train split.
2. One calibration (64 samples x 128 tokens of the train split) gives every score; each target
   is then pruned from that importance file with each expert score (reap, taylor, frequency,
   router_mass) and with random expert / neuron choices (mean of 5 seeds), and every pruned
   model's held-out loss is computed by megatron-core.
Targets: experts 8 -> 4, 8 -> 2, expert width 128 -> 64, shared expert 256 -> 128, and a combined
active-parameter target (experts 8 -> 4 and width 128 -> 64).
3. Recovery: the experts 8 -> 4 student pruned with the default score is distilled from the
   trained model for --distill-steps steps (forward KL + router loss) and evaluated again; so
   is a dense student of the MoE's active size made from it (attention, embeddings and norms
   of the trained MoE; its MLP the shared expert beside each layer's two most important routed
   experts, 256 + 2 x 128 = 512 neurons, router and gates dropped).
Resumable: every model is a directory under --work; a rerun skips what is complete.

usage: .venv/bin/python bench/prune_quality_moe.py [--work /tmp/minitron_moe_quality]
       [--steps 2000] [--seeds 5] [--distill-steps 100] [--train-micro-batch 8]
(tests/test_moe_quality.py runs it at a smaller budget and asserts its claims)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch


def pruning_targets(shared: int) -> dict[str, dict[str, int]]:
    """The targets, for a shared expert of width `shared`."""
    return {
        "experts 8->4": dict(num_moe_experts=4),
        "experts 8->2": dict(num_moe_experts=2),
        "expert width 128->64": dict(moe_ffn_hidden_size=64),
        f"shared expert {shared}->{shared // 2}": dict(
            moe_shared_expert_intermediate_size=shared // 2
        ),
        "experts 8->4 + width 64": dict(num_moe_experts=4, moe_ffn_hidden_size=64),
    }


SCORES = ("reap", "taylor", "frequency", "router_mass")


def make_tokenizer(out: Path, docs: list[str], vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def prepare(work: Path, vocab_size: int):
    """Tokenizer, indexed dataset and the DataSpec ranks read it with."""
    import numpy

    from minitron_nemo.data.datasets import DataSpec, build_indices
    from minitron_nemo.data.indexed import IndexedWriter, token_dtype
    from minitron_nemo.data.sources import gensim_text

    docs = [
        line
        for name in ("lee_background", "wiki_head500")
        for line in gensim_text(name).splitlines()
        if line.strip()
    ]
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        make_tokenizer(tok_dir, docs, vocab_size)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    prefix = work / "data" / "text"
    if not Path(f"{prefix}.idx").is_file():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        ids = [tok(d)["input_ids"] + [tok.eos_token_id] for d in docs]
        writer = IndexedWriter(prefix, token_dtype(len(tok)))
        writer.add_documents(numpy.concatenate(ids), numpy.array([len(i) for i in ids]))
        writer.finalize()
    spec = DataSpec(
        prefixes=(str(prefix),), weights=(1.0,), split="95,0,5", seq_length=128, seed=0,
        cache_dir=str(work / "data" / "cache"), vocab_size=len(tok), eod=tok.eos_token_id,
        heldout_samples=64, calibration_samples=72,
    )  # fmt: skip
    build_indices(spec, ("calibration", "test"))
    return spec, tok_dir


def unigram_loss(spec) -> float:
    """Held-out cross entropy of the train split's unigram distribution (add-one smoothed)."""
    from minitron_nemo.data.datasets import build_indices, heldout_indices, heldout_reader

    train = dataclasses.replace(spec, train_samples=2000)
    build_indices(train, ("train",))
    from minitron_nemo.data.datasets import train_reader

    counts = Counter()
    reader = train_reader(train)
    for start in range(0, 2000, 100):
        counts.update(reader.read(list(range(start, start + 100))).flatten().tolist())
    total = sum(counts.values()) + spec.vocab_size
    held = heldout_reader(spec).read(heldout_indices(spec))[:, 1:].flatten().tolist()
    return -sum(math.log((counts[t] + 1) / total) for t in held) / len(held)


def train_model(
    work: Path, spec, tok_dir: Path, steps: int, shared: int, micro_batch: int = 8
) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from minitron_nemo import atomic
    from minitron_nemo.checkpoint import copy_tokenizer
    from minitron_nemo.config import DistillConfig
    from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
    from minitron_nemo.distill.train import train

    init = work / "init"
    if not atomic.is_complete(init):
        config = AutoConfig.for_model(
            "qwen2_moe", vocab_size=spec.vocab_size, hidden_size=128, intermediate_size=256,
            moe_intermediate_size=128, shared_expert_intermediate_size=shared, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=False, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=spec.eod, eos_token_id=spec.eod,
        )  # fmt: skip
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(work / "init_hf")
        copy_tokenizer(tok_dir, work / "init_hf")
        hf_to_mcore(work / "init_hf", init, force=True)
    cfg = DistillConfig(mode="lm", steps=steps, global_batch_size=16, micro_batch_size=micro_batch,
                        lr=3e-3, min_lr=3e-4, warmup_steps=30, save_every=steps,
                        kd_chunk_tokens=512, moe_aux_loss_coeff=1e-2, log_every=50)  # fmt: skip
    return train(init, work / "trained", cfg, spec)


def dense_student(work: Path, trained: Path, imp: dict, tok_dir: Path) -> Path:
    """A dense Qwen2 of the MoE's active size from the trained MoE: attention, embeddings and
    norms as they are; each layer's MLP the shared expert beside the two routed experts with the
    highest default (taylor) score, the router and the shared expert's gate dropped (so its
    output is not the MoE's: distillation has to adapt it). Returns its megatron checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from minitron_nemo import atomic
    from minitron_nemo.checkpoint import copy_tokenizer
    from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
    from minitron_nemo.convert.mcore_to_hf import mcore_to_hf

    out = work / "dense_init"
    if atomic.is_complete(out):
        return out
    mcore_to_hf(trained, work / "trained_hf", force=True)
    moe = AutoModelForCausalLM.from_pretrained(work / "trained_hf", dtype=torch.float32)
    mc = moe.config
    width = mc.moe_intermediate_size
    config = AutoConfig.for_model(
        "qwen2", vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
        intermediate_size=mc.shared_expert_intermediate_size + 2 * width,
        num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads,
        max_position_embeddings=mc.max_position_embeddings, rope_parameters=mc.rope_parameters,
        rms_norm_eps=mc.rms_norm_eps, tie_word_embeddings=mc.tie_word_embeddings,
        bos_token_id=mc.bos_token_id, eos_token_id=mc.eos_token_id,
    )  # fmt: skip
    state = {k: v for k, v in moe.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(moe.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{i}.mlp."
        keep = imp["experts"][i]["taylor"].topk(2).indices.sort().values
        gate_up = mlp.experts.gate_up_proj.detach()[keep]  # [2, 2 * width, hidden]
        shared = mlp.shared_expert
        state[prefix + "gate_proj.weight"] = torch.cat(
            [shared.gate_proj.weight.detach(), *(e[:width] for e in gate_up)]
        )
        state[prefix + "up_proj.weight"] = torch.cat(
            [shared.up_proj.weight.detach(), *(e[width:] for e in gate_up)]
        )
        state[prefix + "down_proj.weight"] = torch.cat(
            [shared.down_proj.weight.detach(), *mlp.experts.down_proj.detach()[keep]], dim=1
        )
    dense = AutoModelForCausalLM.from_config(config)
    dense.load_state_dict(state, strict=True)
    dense.save_pretrained(work / "dense_init_hf")
    copy_tokenizer(tok_dir, work / "dense_init_hf")
    hf_to_mcore(work / "dense_init_hf", out, force=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/minitron_moe_quality"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary to train")
    parser.add_argument("--shared", type=int, default=256, help="shared expert width")
    parser.add_argument("--train-micro-batch", type=int, default=8, choices=[8, 16],
                        help="micro-batch of the training (16 x 128 tokens a step either way; "
                             "16: one micro-batch a step, ~20%% faster on 2 cores, another "
                             "summation order so another trained model)")  # fmt: skip
    args = parser.parse_args(argv)
    from minitron_nemo import atomic
    from minitron_nemo.config import PruneConfig
    from minitron_nemo.eval.heldout import heldout_losses
    from minitron_nemo.prune.stage import run_prune

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.time()
    spec, tok_dir = prepare(work, args.vocab)
    trained = train_model(work, spec, tok_dir, args.steps, args.shared, args.train_micro_batch)
    targets = pruning_targets(args.shared)
    timings["train_s"] = round(time.time() - start)

    # ~30 prunes of one calibration: no PNGs each (0.9 of 1.4 s a prune on 2 cores)
    base = dict(depth_scores=False, depth_eval_samples=8, micro_batch_size=8, hf_output=False,
                plots=False)  # fmt: skip
    imp_path = work / "calibrated" / "importance.pt"
    start = time.time()
    if not atomic.is_complete(work / "calibrated"):
        run_prune(trained, work / "calibrated", PruneConfig(num_moe_experts=4, **base), spec)
    timings["calibration_s"] = round(time.time() - start)
    imp = torch.load(imp_path, weights_only=False)

    models = {"trained": trained}

    def prune(name: str, importance: Path, **targets) -> None:
        out = work / "pruned" / name.replace(" ", "_").replace(">", "")
        if not atomic.is_complete(out):
            cfg = PruneConfig(**base, **targets, importance=str(importance))
            run_prune(trained, out, cfg, spec)
        models[name] = out / "ckpt"

    for seed in range(args.seeds):  # random experts / neurons: the same file, scores replaced
        path = work / "random" / f"seed{seed}.pt"
        if not path.is_file():
            g = torch.Generator().manual_seed(seed)
            rnd = {**imp, "experts": {
                layer: {k: torch.rand(v.shape, generator=g, dtype=v.dtype) for k, v in s.items()}
                for layer, s in imp["experts"].items()
            }}  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(rnd, path)
        for target, sizes in targets.items():
            prune(f"{target} | random{seed}", path, expert_score="reap", **sizes)
    for target, sizes in targets.items():
        for score in SCORES if "num_moe_experts" in sizes else ("reap",):
            prune(f"{target} | {score}", imp_path, expert_score=score, **sizes)

    from minitron_nemo.config import DistillConfig
    from minitron_nemo.distill.train import train

    start = time.time()
    kd = DistillConfig(steps=args.distill_steps, global_batch_size=16, micro_batch_size=8,
                       lr=1e-3, min_lr=1e-4, warmup_steps=10, save_every=args.distill_steps,
                       kd_chunk_tokens=512, log_every=25)  # fmt: skip
    models["experts 8->4 | taylor, distilled"] = train(
        Path(models["experts 8->4 | taylor"]), work / "distilled", kd, spec, trained
    )
    timings["distill_s"] = round(time.time() - start)
    models["dense"] = dense_student(work, trained, imp, tok_dir)
    start = time.time()
    models["dense, distilled"] = train(models["dense"], work / "dense_distilled", kd, spec, trained)
    timings["distill_dense_s"] = round(time.time() - start)
    losses = heldout_losses(models, spec, work / "heldout.json", micro_batch=8)
    table = {"unigram": unigram_loss(spec), "trained": losses["trained"]["heldout_loss"]}
    rows = []
    for target, sizes in targets.items():
        row = {"target": target, "params": None, "active": None}
        rnd = [losses[f"{target} | random{s}"]["heldout_loss"] for s in range(args.seeds)]
        row["random"] = sum(rnd) / len(rnd)
        row["random_range"] = [min(rnd), max(rnd)]
        for score in SCORES if "num_moe_experts" in sizes else ("reap",):
            row[score] = losses[f"{target} | {score}"]["heldout_loss"]
        report = json.loads(
            (Path(models[f"{target} | reap"]).parent / "prune_report.json").read_text()
        )
        row["params"] = report["params_after"]
        row["active"] = report.get("active_params_after")
        rows.append(row)
    table["rows"] = rows
    table["distilled"] = {
        "pruned": losses["experts 8->4 | taylor"]["heldout_loss"],
        "distilled": losses["experts 8->4 | taylor, distilled"]["heldout_loss"],
        "steps": args.distill_steps,
        "dense": losses["dense"]["heldout_loss"],
        "dense_distilled": losses["dense, distilled"]["heldout_loss"],
        "dense_params": _total_params(Path(models["dense"])),
    }
    table["timings"] = timings
    table["calibration_seconds"] = imp.get("calibration_seconds")
    (work / "results.json").write_text(json.dumps(table, indent=2))
    print(f"unigram {table['unigram']:.3f}, trained MoE {table['trained']:.3f} (held-out loss)")
    print("| target | total / active params | " + " | ".join(SCORES) + " | random (mean of "
          f"{args.seeds}) |\n|---|---|" + "---|" * (len(SCORES) + 1))  # fmt: skip
    for r in rows:
        total = r["params"]["total"] if isinstance(r["params"], dict) else r["params"]
        cells = [f"{r[s]:.3f}" if s in r else "-" for s in SCORES]
        print(f"| {r['target']} | {total / 1e6:.2f}M / {r['active'] / 1e6:.2f}M | "
              + " | ".join(cells) + f" | {r['random']:.3f} ({r['random_range'][0]:.3f}-"
              f"{r['random_range'][1]:.3f}) |")  # fmt: skip
    d = table["distilled"]
    print(f"experts 8->4 (taylor): pruned {d['pruned']:.3f} -> distilled {d['distilled']:.3f} "
          f"after {d['steps']} steps of 16 x 128 tokens")  # fmt: skip
    print(f"dense student of the active size ({d['dense_params'] / 1e6:.2f}M): made "
          f"{d['dense']:.3f} -> distilled {d['dense_distilled']:.3f}, same steps")  # fmt: skip
    print(json.dumps(timings))
    return table


def _total_params(ckpt: Path) -> int:
    from minitron_nemo.models.arch import ModelArch

    return ModelArch.load(ckpt / "arch.yaml").num_parameters()


if __name__ == "__main__":
    main()
