"""Rank worker: load each checkpoint at the given TP/PP/EP, save full logits from one rank.

usage: logits_worker.py TP PP EP TOKENS.pt OUT_DIR CKPT [CKPT ...]
"""

import sys
from pathlib import Path

import torch


def main() -> None:
    from minitron_nemo.checkpoint import load_model
    from minitron_nemo.runtime import distributed
    from minitron_nemo.runtime.forward import forward_logits

    tp, pp, ep = (int(a) for a in sys.argv[1:4])
    tokens = torch.load(sys.argv[4])
    out_dir = Path(sys.argv[5])
    with distributed.initialize(tp=tp, pp=pp, ep=ep) as ctx:
        for ckpt in sys.argv[6:]:
            model, arch = load_model(Path(ckpt))
            logits = forward_logits(model, tokens)
            if logits is not None and ctx.tp_rank == 0 and ctx.dp_rank == 0:
                torch.save(logits[..., : arch.vocab_size].clone(), out_dir / f"{Path(ckpt).name}.pt")


if __name__ == "__main__":
    main()
