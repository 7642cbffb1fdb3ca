"""GPU checks (run where a GPU is lent: `bash bench/gpu_check.sh`): parity on CUDA in fp32 and
bf16, with the local SDPA spec and, when TransformerEngine imports, with the TE spec."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from minitron_nemo.checkpoint import load_model
from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from minitron_nemo.runtime import distributed
from minitron_nemo.runtime.forward import forward_logits
from tests.helpers import VOCAB, make_tiny_hf, max_rel_err

pytestmark = pytest.mark.gpu
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 3e-2)])
@pytest.mark.parametrize(
    "use_te",
    [
        False,
        pytest.param(
            True, marks=pytest.mark.skipif(not HAVE_TE, reason="TransformerEngine not installed")
        ),
    ],
    ids=["local-sdpa", "te"],
)
def test_cuda_parity(tmp_path, dtype, tol, use_te):
    from transformers import AutoModelForCausalLM

    hf_dir = make_tiny_hf("llama", tmp_path / "hf")
    hf_to_mcore(hf_dir, tmp_path / "mc", dtype=dtype)
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).cuda().eval()
    with torch.no_grad():
        ref = hf(tokens.cuda()).logits.float().cpu()
    with distributed.initialize(tp=1, pp=1):
        model, _ = load_model(tmp_path / "mc", use_te=use_te)
        logits = forward_logits(model, tokens.cuda())[..., :VOCAB].float().cpu()
    err = max_rel_err(logits, ref)
    print(f"cuda parity dtype={dtype} te={use_te}: max rel err {err:.2e}")
    assert err < tol
