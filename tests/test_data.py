"""Data: text/jsonl sources, megatron indexed datasets, disjoint splits, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from minitron_nemo.data.indexed import prepare_indexed, read_indexed_stream
from minitron_nemo.data.text import (
    make_samples,
    read_documents,
    split_samples,
    token_stream,
    tokenize_stream,
)
from minitron_nemo.errors import MinitronError
from tests.helpers import make_tiny_tokenizer, synthetic_text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    text = synthetic_text(200)
    (root / "corpus.txt").write_text(text)
    tokenizer = make_tiny_tokenizer(root / "tok", text)
    return root, tokenizer


def test_indexed_dataset_round_trip_through_megatron(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, tokenizer = corpus
    stats = prepare_indexed(str(root / "corpus.txt"), root / "tok", tmp_path / "ds" / "corpus")
    docs = read_documents(str(root / "corpus.txt"))
    dataset = IndexedDataset(str(tmp_path / "ds" / "corpus"))
    assert len(dataset) == stats["documents"] == len(docs)
    first = tokenizer(docs[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert dataset[0].tolist() == first
    expected = tokenize_stream(docs, tokenizer)
    assert torch.equal(read_indexed_stream(str(tmp_path / "ds" / "corpus")), expected)
    assert torch.equal(token_stream(str(tmp_path / "ds" / "corpus"), tokenizer), expected)
    assert not list((tmp_path / "ds").glob("*.incomplete"))


def test_jsonl_source_and_its_errors(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_documents(str(good)) == ["one", "two"]
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(MinitronError, match=r'b\.jsonl:2: expected an object with a "text" string'):
        read_documents(str(bad))
    with pytest.raises(MinitronError, match="data file not found"):
        read_documents(str(tmp_path / "missing.txt"))


def test_splits_are_disjoint_and_sized():
    samples = make_samples(torch.arange(10_000), 31)
    splits = split_samples(samples, heldout=10, calibration=20, distill=50)
    assert (splits.heldout.shape[0], splits.calibration.shape[0], splits.distill.shape[0]) == (
        10,
        20,
        50,
    )
    rows = [set(s[:, 0].tolist()) for s in (splits.heldout, splits.calibration, splits.distill)]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    with pytest.raises(MinitronError, match="cannot give 300 held-out"):
        split_samples(samples, heldout=300, calibration=20)
