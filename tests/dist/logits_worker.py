"""torchrun worker: load each checkpoint at the given TP/PP, save full logits from one rank.

usage: logits_worker.py TP PP TOKENS.pt OUT_DIR CKPT [CKPT ...]
"""

import sys
from pathlib import Path

import torch


def main() -> None:
    from megatron.core import parallel_state

    from minitron_nemo.checkpoint import load_model
    from minitron_nemo.runtime import distributed
    from minitron_nemo.runtime.forward import forward_logits

    tp, pp = int(sys.argv[1]), int(sys.argv[2])
    tokens = torch.load(sys.argv[3])
    out_dir = Path(sys.argv[4])
    with distributed.initialize(tp=tp, pp=pp):
        for ckpt in sys.argv[5:]:
            model, arch = load_model(Path(ckpt))
            logits = forward_logits(model, tokens)
            if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
                torch.save(logits[..., : arch.vocab_size].clone(), out_dir / f"{Path(ckpt).name}.pt")


if __name__ == "__main__":
    main()
