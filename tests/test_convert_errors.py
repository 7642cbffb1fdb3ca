"""Bad inputs get one clear error, and no output directory that looks complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from minitron_nemo.atomic import incomplete_path
from minitron_nemo.convert.hf_to_mcore import hf_to_mcore
from minitron_nemo.convert.mcore_to_hf import mcore_to_hf
from minitron_nemo.errors import MinitronError
from tests.helpers import REPO, make_tiny_hf


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    return make_tiny_hf("llama", tmp_path / "hf")


def _rewrite(hf_dir: Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, str(path))


def _assert_fails(hf_dir: Path, out: Path, match: str, **kwargs) -> None:
    with pytest.raises(MinitronError, match=match):
        hf_to_mcore(hf_dir, out, **kwargs)
    assert not out.exists()
    assert not incomplete_path(out).exists()


def test_missing_tensor(hf_dir, tmp_path):
    _rewrite(hf_dir, lambda s: s.pop("model.layers.2.mlp.up_proj.weight"))
    _assert_fails(
        hf_dir, tmp_path / "out", r"missing tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"
    )


def test_extra_unknown_tensor(hf_dir, tmp_path):
    _rewrite(
        hf_dir,
        lambda s: s.update(
            {"model.layers.0.self_attn.q_norm.weight": s["model.norm.weight"].clone()}
        ),
    )
    _assert_fails(
        hf_dir, tmp_path / "out", r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm"
    )


def test_unsupported_architecture(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    _assert_fails(
        hf_dir, tmp_path / "out", r"GPTNeoXForCausalLM.*not supported; supported: LlamaForCausalLM"
    )


def test_unknown_config_key_is_refused(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["attn_logit_softcapping"] = 50.0
    (hf_dir / "config.json").write_text(json.dumps(config))
    _assert_fails(hf_dir, tmp_path / "out", r"attn_logit_softcapping.*not understood")


def test_unsupported_config_value_is_refused(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (hf_dir / "config.json").write_text(json.dumps(config))
    _assert_fails(hf_dir, tmp_path / "out", r"hidden_act = 'gelu' is not supported")


@pytest.mark.parametrize(
    "overrides,tp,match",
    [
        ({}, 3, r"tensor parallel size 3 does not divide arch\.num_attention_heads = 4"),
        (
            {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8},
            4,
            r"tensor parallel size 4 does not divide arch\.num_query_groups = 2",
        ),
        (
            {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 8, "hidden_size": 48},
            3,
            r"tensor parallel size 3 does not divide arch\.padded_vocab_size = 256",
        ),
    ],
    ids=["heads", "groups", "vocab-padding"],
)
def test_tp_not_dividing(tmp_path, overrides, tp, match):
    hf_dir = make_tiny_hf("llama", tmp_path / "hf", **overrides)
    _assert_fails(hf_dir, tmp_path / "out", match, tp=tp)


def test_pp_not_dividing_layers(hf_dir, tmp_path):
    _assert_fails(
        hf_dir,
        tmp_path / "out",
        r"pipeline parallel size 3 does not divide arch\.num_layers = 4",
        pp=3,
    )


def test_truncated_safetensors(hf_dir, tmp_path):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _assert_fails(hf_dir, tmp_path / "out", r"model\.safetensors: truncated safetensors file")


def test_shape_mismatch_inside_conversion_leaves_no_output(hf_dir, tmp_path):
    """A failure after the ranks started still leaves nothing that looks complete."""
    import torch

    _rewrite(
        hf_dir, lambda s: s.update({"model.layers.3.mlp.down_proj.weight": torch.zeros(64, 80)})
    )
    _assert_fails(hf_dir, tmp_path / "out", r"down_proj\.weight: shape \(64, 80\) does not fit")


def test_existing_output_is_not_overwritten(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(MinitronError, match="already exists"):
        hf_to_mcore(hf_dir, out)
    assert (out / "keep.txt").read_text() == "user data"


def test_export_refuses_incomplete_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(MinitronError, match="incomplete checkpoint"):
        mcore_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_and_exits_1(hf_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "minitron_nemo.cli",
            "convert",
            "hf-to-mcore",
            "--hf",
            str(hf_dir),
            "--out",
            str(tmp_path / "out"),
            "--tp",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: tensor parallel size 3 does not divide arch.num_attention_heads = 4"
    )


@pytest.mark.parametrize(
    "family,key,value,match",
    [
        ("qwen3", "use_sliding_window", True, r"use_sliding_window = True is not supported"),
        ("qwen3", "attention_bias", True, r"attention_bias = True is not supported"),
        ("qwen3_moe", "num_experts_per_tok", 0, r"missing required key 'num_experts_per_tok'"),
    ],
)
def test_unsupported_qwen3_and_moe_configs_are_refused(tmp_path, family, key, value, match):
    hf_dir = make_tiny_hf(family, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config[key] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    _assert_fails(hf_dir, tmp_path / "out", match)


def test_ep_on_a_dense_model_or_not_dividing_experts_is_refused(hf_dir, tmp_path):
    _assert_fails(hf_dir, tmp_path / "out", r"expert parallel size 2 needs an MoE model", ep=2)
    moe = make_tiny_hf("mixtral", tmp_path / "moe")  # 4 experts
    _assert_fails(moe, tmp_path / "out2", r"expert parallel size 3 does not divide", ep=3)
