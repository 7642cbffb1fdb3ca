"""GPU checks (run where a GPU is lent: `bash bench/gpu_check.sh`): parity on CUDA in fp32 and
bf16, with the local SDPA spec and, when TransformerEngine imports, with the TE spec (for MoE
models: TEGroupedMLP experts with grouped GEMM and the alltoall dispatcher), for a Llama, a
Qwen3 (q/k norms) and two MoE families; a checkpoint saved by TEGroupedMLP experts exports the
original HF tensors bit for bit (the two expert layouts share one dist-checkpoint format)."""

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


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe_nonorm", "qwen2_moe"])
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
def test_cuda_parity(tmp_path, family, dtype, tol, use_te):
    from transformers import AutoModelForCausalLM

    hf_dir = make_tiny_hf(family, tmp_path / "hf")
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
    print(f"cuda parity {family} dtype={dtype} te={use_te}: max rel err {err:.2e}")
    assert err < tol


@pytest.mark.skipif(not HAVE_TE, reason="TransformerEngine not installed")
def test_grouped_experts_save_the_sequential_format(tmp_path):
    """Load (SequentialMLP-converted) into TEGroupedMLP, save from it, export: the HF tensors
    are the original ones."""
    from safetensors.torch import load_file

    from minitron_nemo import checkpoint
    from minitron_nemo.convert.mcore_to_hf import mcore_to_hf

    hf_dir = make_tiny_hf("qwen2_moe", tmp_path / "hf")
    hf_to_mcore(hf_dir, tmp_path / "mc")
    with distributed.initialize(tp=1, pp=1):
        model, _ = load_model(tmp_path / "mc", use_te=True)
        assert type(model.decoder.layers[0].mlp.experts).__name__ == "TEGroupedMLP"
        checkpoint.save_weights(model, tmp_path / "grouped" / "weights")
    for name in ("arch.yaml", "meta.yaml", "DONE"):
        (tmp_path / "grouped" / name).write_bytes((tmp_path / "mc" / name).read_bytes())
    mcore_to_hf(tmp_path / "grouped", tmp_path / "out")
    original, exported = load_file(hf_dir / "model.safetensors"), {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        exported.update(load_file(f))
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())
