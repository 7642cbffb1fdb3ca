"""Samples through megatron-core's datasets: `BlendedMegatronDatasetBuilder` + `GPTDataset`.

A `DataSpec` (paths and numbers, never tokens) is all a rank receives. From it each rank builds
the view it reads: `train` (distillation, teacher correction, the scratch baseline: the train
split built for that training's steps x global batch), `calibration` (importance: one shuffled
epoch of the train split, whatever the training length, so changing the training does not change
the pruned model) or `test` (held-out evaluation). megatron's document / sample / shuffle indices
are loaded from the cache built before the ranks start, the .bin files are read a sample at a
time, so a rank's memory does not grow with the data. The split is megatron's document-level
split ("99,0.5,0.5": contiguous ranges of each dataset's documents), so train and test never
share a document.

A sample is [seq_length + 1] token ids (inputs + the next token), as megatron's GPTDataset reads
it. Batches follow megatron's pretraining sampler: optimizer step k trains on the global samples
[consumed, consumed + global_batch) of the (already shuffled) train split, each data-parallel
rank taking its micro-batches out of every (micro_batch x dp) slice. Nothing is permuted per
step, a resumed run continues from `consumed_samples`, at any data-parallel size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from minitron_nemo.data.spec import parse_split
from minitron_nemo.errors import MinitronError

SPLITS = ("train", "valid", "test")


def document_range(num_documents: int, split: str, which: str) -> tuple[int, int]:
    """[begin, end) of the documents of split `which`, computed as megatron's builder does."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
    )
    from megatron.core.datasets.utils import normalize

    bounds = convert_split_vector_to_split_matrix(normalize(parse_split(split)))
    bound = bounds[SPLITS.index(which)]
    if bound is None:
        return 0, 0
    return int(round(bound[0] * float(num_documents))), int(round(bound[1] * float(num_documents)))


@dataclass(frozen=True)
class DataSpec:
    """What a rank needs to read samples (all paths absolute)."""

    prefixes: tuple[str, ...]
    """Indexed datasets (PREFIX.bin / .idx)."""
    weights: tuple[float, ...]
    """Blend weights, one per prefix (normalised by megatron)."""
    split: str
    seq_length: int
    seed: int
    cache_dir: str
    """megatron's sample-index cache (built once by the data stage)."""
    vocab_size: int
    eod: int
    heldout_samples: int
    """Samples of the test split for held-out evaluation."""
    calibration_samples: int
    """Samples of the calibration view: the first of one shuffled epoch of the train split."""
    train_samples: int = 0
    """Samples of the train view (set by the training stage: steps x global batch)."""

    @property
    def sample_length(self) -> int:
        return self.seq_length + 1


class _TokenizerInfo:
    """What megatron's GPTDataset reads of a tokenizer (EOD, vocabulary size); it is part of
    the cache key through `unique_identifiers`."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = {"class": "minitron", "vocab_size": vocab_size, "eod": eod}


def _gpt_config(spec: DataSpec, which: str, cache_dir: str):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=spec.seed,
        sequence_length=spec.seq_length,
        blend=(list(spec.prefixes), list(spec.weights) if len(spec.prefixes) > 1 else None),
        split=spec.split,
        path_to_cache=cache_dir,
        tokenizer=_TokenizerInfo(spec.vocab_size, spec.eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # [s, s] per sample; our attention is causal SDPA
        # Read samples with file reads, not a memory map of the .bin: on a mapped multi-GB file
        # every random sample faults in the kernel's read-around window, so a rank's RSS grows
        # toward the dataset's size (measured in bench/data_scale.py).
        mmap_bin_files=False,
    )
    # Build only the split this caller reads (megatron builds every split with a share > 0).
    wanted = SPLITS.index(which)
    config.split_matrix = [m if i == wanted else None for i, m in enumerate(config.split_matrix)]
    return config


def _check_split_documents(spec: DataSpec, which: str) -> None:
    from minitron_nemo.data.indexed import open_indexed

    for prefix in spec.prefixes:
        n = len(open_indexed(prefix))
        begin, end = document_range(n, spec.split, which)
        if end <= begin:
            raise MinitronError(
                f"{prefix}: {n} documents leave the {which} part of data.split "
                f"{spec.split!r} empty; give it a larger share or use more documents"
            )


def build_split(spec: DataSpec, which: str, num_samples: int, cache_dir: str | None = None):
    """megatron's dataset (GPTDataset, or BlendedDataset of them) for split `which`."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    _check_split_documents(spec, which)
    sizes = [num_samples if name == which else 0 for name in SPLITS]
    config = _gpt_config(spec, which, cache_dir or spec.cache_dir)
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return datasets[SPLITS.index(which)]


def _repeats_documents(dataset) -> bool:
    parts = getattr(dataset, "datasets", None) or [dataset]
    return any(len(part.document_index) > len(part.indices) for part in parts)


def _index_key(spec: DataSpec, views: Sequence[str]) -> str:
    """Identity of the indices build_indices makes: the views' sizes, the spec and each
    dataset file's stat."""
    files = [
        (p, os.stat(p + ext).st_size, os.stat(p + ext).st_mtime_ns)
        for p in spec.prefixes
        for ext in (".bin", ".idx")
    ]
    sizes = {v: view_size(spec, v) for v in views}
    spec_fields = {k: v for k, v in dataclasses.asdict(spec).items() if not k.endswith("_samples")}
    blob = json.dumps([spec_fields, sizes, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


VIEWS = {"train": "train", "calibration": "train", "test": "test"}
"""View -> the split of data.split it reads."""


def view_size(spec: DataSpec, view: str) -> int:
    return {
        "train": spec.train_samples,
        "calibration": spec.calibration_samples,
        "test": spec.heldout_samples,
    }[view]


def build_indices(spec: DataSpec, views: Sequence[str] = ("calibration", "test")) -> dict:
    """Build megatron's indices of `views` into the cache, atomically: they are written to a
    private directory and moved into the cache (descriptions last, which megatron's cache-hit
    test requires), so a killed build never leaves an index that looks complete; then a marker
    records the build, and a second call with the same spec and files returns at once. Views of
    size 0 are skipped. Returns the number of samples of each view."""
    views = [v for v in views if view_size(spec, v) > 0]
    cache = Path(spec.cache_dir)
    marker = cache / f"minitron-{_index_key(spec, views)}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    counts = {}
    try:
        for view in views:
            dataset = build_split(spec, VIEWS[view], view_size(spec, view), str(tmp))
            if view == "test" and _repeats_documents(dataset):
                raise MinitronError(
                    f"data: the test part of data.split {spec.split!r} holds fewer than "
                    f"data.heldout_samples = {spec.heldout_samples} samples of "
                    f"{spec.sample_length} tokens; lower heldout_samples or raise the test share"
                )
            counts[view] = len(dataset)
        if tmp.is_dir():
            files = sorted(tmp.iterdir(), key=lambda p: (p.name.endswith("description.txt"), p))
            for path in files:
                os.replace(path, cache / path.name)
    finally:
        if tmp.is_dir():
            for path in tmp.iterdir():
                path.unlink()
            tmp.rmdir()
    marker_tmp = marker.with_suffix(f".{os.getpid()}.tmp")
    marker_tmp.write_text(json.dumps(counts))
    os.replace(marker_tmp, marker)
    return counts


class SampleReader:
    """Reads samples [n, seq_length + 1] by index from one view (memory: the samples read)."""

    def __init__(self, spec: DataSpec, view: str) -> None:
        self.spec = spec
        self.view = view
        self.dataset = build_split(spec, VIEWS[view], view_size(spec, view))

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        if indices and max(indices) >= len(self.dataset):
            raise MinitronError(
                f"data: sample {max(indices)} of the {self.view} view was asked for, but it was "
                f"built for {len(self.dataset)} samples"
            )
        rows = []
        for i in indices:
            item = self.dataset[int(i)]
            rows.append(torch.cat([item["tokens"], item["labels"][-1:]]))
        return torch.stack(rows)

    def batches(self, indices: Sequence[int], batch_size: int):
        """Samples `indices` in batches of `batch_size`, read one batch at a time."""
        for start in range(0, len(indices), batch_size):
            yield self.read(indices[start : start + batch_size])


def train_reader(spec: DataSpec) -> SampleReader:
    return SampleReader(spec, "train")


def calibration_reader(spec: DataSpec) -> SampleReader:
    return SampleReader(spec, "calibration")


def heldout_reader(spec: DataSpec) -> SampleReader:
    return SampleReader(spec, "test")


def heldout_indices(spec: DataSpec) -> list[int]:
    return list(range(spec.heldout_samples))


def calibration_indices(spec: DataSpec) -> list[int]:
    """The calibration samples (P1: 1024 random samples of the training data): the first
    `calibration_samples` of the calibration view, which megatron has shuffled."""
    return list(range(spec.calibration_samples))


def step_sample_indices(
    consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    """Global sample indices of each of this rank's micro-batches for the step that starts
    after `consumed` samples (megatron's MegatronPretrainingSampler layout)."""
    stride = micro_batch * dp_size
    first = consumed + dp_rank * micro_batch
    return [
        list(range(first + start, first + start + micro_batch))
        for start in range(0, global_batch, stride)
    ]


def step_microbatches(
    reader: SampleReader,
    consumed: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
) -> list[torch.Tensor]:
    """This rank's micro-batches [micro_batch, seq_length + 1] of one optimizer step."""
    return [
        reader.read(idx)
        for idx in step_sample_indices(consumed, global_batch, micro_batch, dp_rank, dp_size)
    ]
