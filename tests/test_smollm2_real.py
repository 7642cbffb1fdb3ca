"""Real model: SmolLM2-135M (embedded GGUF) -> megatron -> HF, on real English text."""

from __future__ import annotations

import pytest
import torch

from minitron_nemo.checkpoint import load_model
from minitron_nemo.convert.mcore_to_hf import mcore_to_hf
from minitron_nemo.runtime import distributed
from minitron_nemo.runtime.forward import forward_logits
from tests.helpers import max_rel_err

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(default_run, tmp_path_factory):
    """The teacher as the shared default run converted it (tests/conftest.py), exported back."""
    from minitron_nemo.data.sources import gensim_text, smollm2_hf_dir

    run_dir, _ = default_run
    root = tmp_path_factory.mktemp("smollm2")
    mcore_to_hf(run_dir / "teacher", root / "hf_out")
    text = gensim_text("lee_background")[:4000]
    return {"hf": smollm2_hf_dir(), "mcore": run_dir / "teacher", "out": root / "hf_out",
            "text": text}  # fmt: skip


def test_mcore_logits_match_transformers_on_real_text(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2["hf"])
    tokens = tokenizer(smollm2["text"], return_tensors="pt").input_ids[:, :256]
    hf = AutoModelForCausalLM.from_pretrained(smollm2["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(tokens).logits
    with distributed.initialize(tp=1, pp=1):
        model, arch = load_model(smollm2["mcore"])
        logits = forward_logits(model, tokens)[..., : arch.vocab_size]
    err = max_rel_err(logits, ref)
    assert err < 1e-4, f"max rel err {err:.2e}"
    # The model is real: perplexity on news text is far below uniform (49152).
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    assert loss.exp().item() < 100


def test_round_tripped_model_generates_the_same(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2["out"])
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    outputs = []
    for path in (smollm2["hf"], smollm2["out"]):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            outputs.append(model.generate(**prompt, max_new_tokens=12, do_sample=False))
    assert torch.equal(outputs[0], outputs[1])
    assert "Paris" in tokenizer.decode(outputs[1][0])
