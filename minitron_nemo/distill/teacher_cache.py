"""Teacher top-K logits cache: the teacher's top-K distribution (distill/topk_loss.py) for every
token of a train view, computed once on the run's ranks and read by any number of distillations
without the teacher: the architecture search's candidates, or a normal distillation through
`distill.teacher_cache`. The arrays are raw files (np.memmap-able, e.g. for inspection); ranks
read and write them by rows (pread / pwrite), so a rank holds the rows of its micro-batch only.

A cache directory (complete when it holds DONE; built in `.NAME.incomplete`, resumable)::

    meta.json      K, temperature, dtypes, samples, seq_length, vocabulary size, tokenizer
                   fingerprint, data identity, teacher
    tokens.bin     [samples, seq_length + 1]   the samples themselves: a training compares every
                                               micro-batch it reads with them
    ids.bin        [samples, seq_length, K]    top-K token ids (uint16 when the vocabulary fits)
    logp.bin       [samples, seq_length, K]    their log-probabilities at T (bf16, or fp32)
    log_tail.bin   [samples, seq_length]       log of the teacher's mass outside the top K (fp32)
    progress.json  (while building) samples written

Bytes per token: K x (value + id bytes) + 4 + the sample's token, i.e. 262 B at K = 64 and 518 B
at K = 128 with bf16 values and uint16 ids (a vocabulary < 65536, e.g. SmolLM2), 392 B / 776 B
with int32 ids (Llama-3).
Sample j of the cache is sample j of the train view it was built for, so a training reads rows
by the same global sample indices as its data (megatron's pretraining-sampler layout).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minitron_nemo import atomic
from minitron_nemo.data.datasets import DataSpec
from minitron_nemo.distill.topk_loss import TeacherTopK
from minitron_nemo.errors import MinitronError
from minitron_nemo.runtime.diskspace import require_free

FORMAT = 1
VALUE_DTYPES = {"bfloat16": (np.uint16, torch.bfloat16), "float32": (np.float32, torch.float32)}


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """sha256 of the token -> id mapping (tokenizer.json's vocabulary and added tokens), or of
    the directory's files when there is no tokenizer.json."""
    path = tokenizer_dir / "tokenizer.json"
    h = hashlib.sha256()
    if path.is_file():
        raw = json.loads(path.read_text())
        h.update(json.dumps(raw.get("model", {}).get("vocab"), sort_keys=True).encode())
        h.update(json.dumps(raw.get("added_tokens"), sort_keys=True).encode())
    elif tokenizer_dir.is_dir():
        for f in sorted(tokenizer_dir.iterdir()):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def data_identity(data: DataSpec) -> dict:
    """What decides which samples a train view holds (besides its length)."""
    return {
        "prefixes": list(data.prefixes),
        "weights": list(data.weights),
        "split": data.split,
        "seq_length": data.seq_length,
        "seed": data.seed,
    }


@dataclass(frozen=True)
class CacheMeta:
    top_k: int
    temperature: float
    value_dtype: str
    samples: int
    seq_length: int
    vocab_size: int
    tokenizer: str
    data: dict
    teacher: str
    format: int = FORMAT

    @property
    def id_dtype(self):
        return np.uint16 if self.vocab_size <= 65536 else np.int32

    def shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
        n, s, k = self.samples, self.seq_length, self.top_k
        return {
            "tokens": ((n, s + 1), self.id_dtype),
            "ids": ((n, s, k), self.id_dtype),
            "logp": ((n, s, k), VALUE_DTYPES[self.value_dtype][0]),
            "log_tail": ((n, s), np.float32),
        }

    def total_bytes(self) -> int:
        return sum(
            int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in self.shapes().values()
        )

    def bytes_per_token(self) -> float:
        return self.total_bytes() / (self.samples * self.seq_length)

    @classmethod
    def read(cls, path: Path) -> CacheMeta:
        try:
            return cls(**json.loads((path / "meta.json").read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise MinitronError(f"{path / 'meta.json'}: not a teacher cache ({exc})") from None


class _Rows:
    """One array of a cache on disk ([samples, ...] raw, np.memmap-able), rows read and written
    with pread / pwrite: a process holds only the rows it asked for (a memmap's touched pages
    would stay in the rank's resident memory, growing it by the cache's size over a run)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype) -> None:
        self.path, self.row_shape, self.dtype = path, shape[1:], np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.size = shape[0] * self.row_bytes

    def allocate(self) -> None:
        with open(self.path, "wb") as fh:  # sparse until written
            fh.truncate(self.size)

    def read(self, indices: list[int]) -> np.ndarray:
        out = np.empty((len(indices), *self.row_shape), self.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for j, i in enumerate(indices):
                buf = os.pread(fd, self.row_bytes, int(i) * self.row_bytes)
                if len(buf) != self.row_bytes:
                    raise MinitronError(f"{self.path}: truncated (row {i} is missing)")
                out[j] = np.frombuffer(buf, self.dtype).reshape(self.row_shape)
        finally:
            os.close(fd)
        return out

    def write(self, indices: list[int], rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows).view(self.dtype)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for j, i in enumerate(indices):
                os.pwrite(fd, rows[j].tobytes(), int(i) * self.row_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)


def _files(path: Path, meta: CacheMeta) -> dict[str, _Rows]:
    return {
        name: _Rows(path / f"{name}.bin", shape, dt) for name, (shape, dt) in meta.shapes().items()
    }


class TeacherCache:
    """Read side: rows of a complete cache by global sample index (memory: the rows read)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not atomic.is_complete(self.path):
            raise MinitronError(f"{self.path}: not a complete teacher cache (no {atomic.DONE})")
        self.meta = CacheMeta.read(self.path)
        self.files = _files(self.path, self.meta)

    def tokens(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.files["tokens"].read(indices).astype(np.int64))

    def read(self, indices: list[int]) -> TeacherTopK:
        """The top K of samples `indices`: logp / ids [n, s, K], log_tail [n, s]."""
        logp = self.files["logp"].read(indices)
        if self.meta.value_dtype == "bfloat16":  # raw bf16 bits (numpy has no bf16)
            logp = torch.from_numpy(logp.view(np.int16)).view(torch.bfloat16)
        else:
            logp = torch.from_numpy(logp)
        ids = torch.from_numpy(self.files["ids"].read(indices).astype(np.int64))
        log_tail = torch.from_numpy(self.files["log_tail"].read(indices))
        return TeacherTopK(logp, ids, log_tail)

    def check_batch(self, indices: list[int], batch: torch.Tensor) -> None:
        """Refuse a micro-batch whose tokens are not the cached samples'."""
        cached = self.tokens(indices)
        if not torch.equal(cached, batch.cpu().long()):
            first = next(i for i, a, b in zip(indices, cached, batch.cpu(), strict=True)
                         if not torch.equal(a, b.long()))  # fmt: skip
            raise MinitronError(
                f"{self.path}: sample {first} of the training data differs from the one the "
                "cache was built for (other data, split, seed or sequence length?); rebuild it"
            )


def expected_meta(
    teacher_ckpt: Path, data: DataSpec, k: int, temperature: float, value_dtype: str
) -> CacheMeta:
    from minitron_nemo.models.arch import ModelArch

    arch = ModelArch.load(teacher_ckpt / "arch.yaml")
    return CacheMeta(
        top_k=k,
        temperature=float(temperature),
        value_dtype=value_dtype,
        samples=data.train_samples,
        seq_length=data.seq_length,
        vocab_size=arch.vocab_size,
        tokenizer=tokenizer_fingerprint(teacher_ckpt / "tokenizer"),
        data=data_identity(data),
        teacher=str(teacher_ckpt),
    )


def check_cache(
    path: Path, k: int, temperature: float, tokenizer_dir: Path, data: DataSpec, micro_batch: int
) -> CacheMeta:
    """Refuse (one line) a cache whose K, temperature, tokenizer, data or length do not match
    a training on `data`'s train view (data.train_samples samples; its first micro-batch is
    compared here, the others by the trainer as it reads them)."""
    cache = TeacherCache(path)
    meta = cache.meta
    where = path / "meta.json"
    if meta.format != FORMAT:
        raise MinitronError(f"{where}: cache format {meta.format}, this version reads {FORMAT}")
    if meta.top_k != k:
        raise MinitronError(f"{where}: built with top_k {meta.top_k}, distill.top_k is {k}")
    if meta.temperature != float(temperature):
        raise MinitronError(
            f"{where}: built at temperature {meta.temperature}, distill.temperature is "
            f"{temperature}"
        )
    if meta.tokenizer != tokenizer_fingerprint(tokenizer_dir):
        raise MinitronError(
            f"{where}: the teacher's tokenizer differs from the student's ({tokenizer_dir})"
        )
    if meta.data != data_identity(data):
        diff = next(key for key in meta.data if meta.data[key] != data_identity(data)[key])
        raise MinitronError(
            f"{where}: built for other data (data {diff}: {meta.data[diff]!r} vs "
            f"{data_identity(data)[diff]!r})"
        )
    if meta.samples < data.train_samples:
        raise MinitronError(
            f"{where}: holds {meta.samples} samples, the training reads {data.train_samples} "
            "(steps x global_batch_size)"
        )
    from minitron_nemo.data.datasets import train_reader

    first = list(range(min(micro_batch, data.train_samples)))
    cache.check_batch(first, train_reader(data).read(first))
    return meta


# -- building ------------------------------------------------------------------------------


def build_teacher_cache(
    teacher_ckpt: Path,
    data: DataSpec,
    out: Path,
    k: int,
    temperature: float = 1.0,
    value_dtype: str = "bfloat16",
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    micro_batch: int = 1,
    round_samples: int | None = None,
    chunk_tokens: int | None = None,
    ep: int = 1,
) -> Path:
    """Build (or finish) the cache of `data`'s train view (data.train_samples samples) at `out`
    on tp x pp x dp ranks (an MoE teacher's experts split over `ep` of the dp ranks; every rank
    runs the same micro-batches per round, as the expert exchange needs); each round of
    `round_samples` samples is flushed and recorded, so a killed build resumes where it stopped.
    A complete cache with the same meta is returned as it is; one with another meta is refused
    (remove it to rebuild)."""
    from minitron_nemo.data.datasets import build_indices
    from minitron_nemo.runtime.launch import run_on_ranks

    if value_dtype not in VALUE_DTYPES:
        raise MinitronError(f"teacher cache dtype: expected one of {list(VALUE_DTYPES)}")
    meta = expected_meta(teacher_ckpt, data, k, temperature, value_dtype)
    if atomic.is_complete(out):
        if CacheMeta.read(out) != meta:
            raise MinitronError(f"{out}: a teacher cache built for other settings; remove it")
        return out
    round_samples = round_samples or micro_batch * dp
    if data.train_samples % (micro_batch * dp) or round_samples % (micro_batch * dp):
        raise MinitronError(
            f"teacher cache: {data.train_samples} samples in rounds of {round_samples} do not "
            f"split into micro-batches of {micro_batch} x {dp} data-parallel ranks"
        )
    build_indices(data, ("train",))
    tmp = atomic.incomplete_path(out)
    if tmp.is_dir() and atomic.read_json(tmp / "meta.json") != asdict(meta):
        shutil.rmtree(tmp)
    if not tmp.is_dir():
        tmp.mkdir(parents=True)
        for rows in _files(tmp, meta).values():  # allocated before the ranks write into them
            rows.allocate()
        atomic.write_json(tmp / "progress.json", {"samples": 0})
        atomic.write_json(tmp / "meta.json", asdict(meta))
    # The files are sparse until written: check the space now rather than fail mid-build.
    done = atomic.read_json(tmp / "progress.json")["samples"]
    require_free(tmp, int(meta.total_bytes() * (1 - done / meta.samples)))
    run_on_ranks(
        _build_on_rank, tp * pp * dp, teacher_ckpt, data, tmp, meta, tp, pp, micro_batch,
        round_samples, chunk_tokens, ep,
    )  # fmt: skip
    if atomic.read_json(tmp / "progress.json")["samples"] != meta.samples:
        raise RuntimeError(f"teacher cache {tmp} ended before its last sample")
    (tmp / "progress.json").unlink()
    (tmp / atomic.DONE).write_text("")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_for_distillation(
    teacher_ckpt: Path, cfg, data: DataSpec, out: Path, value_dtype: str = "bfloat16",
    tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1,
) -> Path:  # fmt: skip
    """The cache a distillation with `cfg` (a DistillConfig) reads: its steps x global batch
    samples of `data`'s train view, K = cfg.top_k, T = cfg.temperature, one round per step."""
    import dataclasses

    return build_teacher_cache(
        teacher_ckpt,
        dataclasses.replace(data, train_samples=cfg.steps * cfg.global_batch_size),
        out, cfg.top_k, cfg.temperature, value_dtype, tp=tp, pp=pp, dp=dp,
        micro_batch=cfg.micro_batch_size, round_samples=cfg.global_batch_size,
        chunk_tokens=cfg.kd_chunk_tokens, ep=ep,
    )  # fmt: skip


def summary(path: Path) -> dict:
    """K, tokens and size on disk of a cache."""
    meta = CacheMeta.read(path)
    return {
        "path": str(path),
        "top_k": meta.top_k,
        "tokens": meta.samples * meta.seq_length,
        "bytes": sum(f.stat().st_size for f in path.glob("*.bin")),
        "bytes_per_token": meta.bytes_per_token(),
    }


def teacher_top_k_of_hidden(
    hidden_sbh: torch.Tensor,
    weight_vh: torch.Tensor,
    vocab_size: int,
    k: int,
    temperature: float,
    chunk_tokens: int | None,
    group,
) -> TeacherTopK:
    """The top K of every token [s * b] from final hidden states, chunk by chunk exactly as the
    trainer's online top-K loss makes them (vocab_loss._chunk), so both read the same values."""
    from megatron.core import parallel_state

    from minitron_nemo.distill.topk_loss import teacher_top_k
    from minitron_nemo.distill.vocab_loss import output_logits

    vocab_start = parallel_state.get_tensor_model_parallel_rank() * weight_vh.shape[0]
    h = hidden_sbh.reshape(-1, hidden_sbh.shape[-1])
    chunk = chunk_tokens or h.shape[0]
    parts = []
    for start in range(0, h.shape[0], chunk):
        logits = output_logits(h[start : start + chunk], weight_vh, vocab_size, vocab_start)
        parts.append(teacher_top_k(logits, k, temperature, vocab_start, group))
    return TeacherTopK(*(torch.cat(x) for x in zip(*parts, strict=True)))


def _build_on_rank(
    teacher_ckpt: Path,
    data: DataSpec,
    tmp: Path,
    meta: CacheMeta,
    tp: int,
    pp: int,
    micro_batch: int,
    round_samples: int,
    chunk_tokens: int | None,
    ep: int = 1,
) -> None:
    from megatron.core import parallel_state

    from minitron_nemo import checkpoint
    from minitron_nemo.data.datasets import step_sample_indices, train_reader
    from minitron_nemo.distill.pair import final_hidden_states, output_weight
    from minitron_nemo.runtime import distributed
    from minitron_nemo.runtime.forward import run_forward
    from minitron_nemo.runtime.progress import Progress

    with distributed.initialize(tp=tp, pp=pp, ep=ep) as ctx:
        model, arch = checkpoint.load_model(teacher_ckpt)
        reader = train_reader(data)
        files = _files(tmp, meta)
        writer = ctx.is_last_stage and ctx.tp_rank == 0
        tp_group = parallel_state.get_tensor_model_parallel_group()
        weight = output_weight(model) if ctx.is_last_stage else None
        done = atomic.read_json(tmp / "progress.json")["samples"]
        bar = Progress(meta.samples, "teacher cache", unit="sample", rank0_only=False,
                       enabled=writer and ctx.dp_rank == 0)  # fmt: skip
        bar.update(done)

        def on_output(hidden_sbh, batch):
            top = teacher_top_k_of_hidden(hidden_sbh, weight, arch.vocab_size, meta.top_k,
                                          meta.temperature, chunk_tokens, tp_group)  # fmt: skip
            s, b = hidden_sbh.shape[:2]
            return TeacherTopK(
                top.logp.reshape(s, b, -1).transpose(0, 1),
                top.ids.reshape(s, b, -1).transpose(0, 1),
                top.log_tail.reshape(s, b).transpose(0, 1),
            )

        for start in range(done, meta.samples, round_samples):
            size = min(round_samples, meta.samples - start)
            groups = step_sample_indices(start, size, micro_batch, ctx.dp_rank, ctx.dp)
            batches = [reader.read(idx).to(ctx.device) for idx in groups]
            outputs = run_forward(model, batches, on_output, output_processor=final_hidden_states)
            if writer:
                for idx, batch, top in zip(groups, batches, outputs, strict=True):
                    files["tokens"].write(idx, batch.cpu().numpy().astype(meta.id_dtype))
                    files["ids"].write(idx, top.ids.cpu().numpy().astype(meta.id_dtype))
                    logp = top.logp.float().cpu()
                    if meta.value_dtype == "bfloat16":  # raw bf16 bits
                        logp = logp.bfloat16().view(torch.int16)
                    files["logp"].write(idx, logp.numpy())
                    files["log_tail"].write(idx, top.log_tail.float().cpu().numpy())
            if dist.get_world_size() > 1:
                dist.barrier()
            if ctx.rank == 0:
                atomic.write_json(tmp / "progress.json", {"samples": start + size})
            bar.update(size)
        bar.close()
