"""Rank worker: gradients of MoE checkpoints at EP = world size (TP = PP = 1).

Rank r runs forward + backward of sum(logits * weights[r]) over its own tokens (tokens[r]) in
training mode (router aux loss off) and saves the gradients of layer 0's parameters, local
experts named by their global index, to OUT_DIR/{ckpt name}_rank{r}.pt.

usage: moe_grad_worker.py TOKENS.pt WEIGHTS.pt OUT_DIR CKPT [CKPT ...]
"""

import os
import sys
from pathlib import Path

import torch


def main() -> None:
    from minitron_nemo.checkpoint import load_model
    from minitron_nemo.convert.hf_to_mcore import global_name
    from minitron_nemo.runtime import distributed
    from minitron_nemo.runtime.forward import position_ids

    tokens, weights = torch.load(sys.argv[1]), torch.load(sys.argv[2])
    out_dir = Path(sys.argv[3])
    world = int(os.environ["WORLD_SIZE"])
    with distributed.initialize(tp=1, pp=1, ep=world) as ctx:
        for ckpt in map(Path, sys.argv[4:]):
            model, arch = load_model(ckpt)
            model.train()
            mine = tokens[ctx.rank]
            logits = model(mine, position_ids(mine), attention_mask=None)
            (logits[..., : arch.vocab_size] * weights[ctx.rank]).sum().backward()
            grads = {}
            for name, param in model.named_parameters():
                if name.startswith("decoder.layers.0.") and param.grad is not None:
                    pattern, _layer, expert = global_name(name, model)
                    key = pattern.replace("<e>", str(expert)) if expert is not None else pattern
                    grads[key] = param.grad.detach().clone()
            torch.save(grads, out_dir / f"{ckpt.name}_rank{ctx.rank}.pt")


if __name__ == "__main__":
    main()
