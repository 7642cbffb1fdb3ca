"""minitron-nemo: structured pruning + distillation of LLMs on megatron-core."""

import re
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="minitron-nemo",
    version=re.search(
        r'__version__ = "([^"]+)"',
        (Path(__file__).parent / "minitron_nemo/__init__.py").read_text(),
    ).group(1),
    description="Prune and distill LLMs the Minitron way on megatron-core (HF in, HF out).",
    packages=find_packages(include=["minitron_nemo", "minitron_nemo.*"]),
    # The recipes ship with the package: `minitron run` without a recipe runs the default one
    # after a plain wheel install; `recipes/` at the top of the tree is a link to them.
    package_data={"minitron_nemo": ["recipes/*.yaml"]},
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.19.2",
        "transformers>=4.56",
        "safetensors>=0.4",
        "sentencepiece",
        "omegaconf>=2.3",
        "pyyaml",
        "psutil",  # megatron dist-checkpoint save imports it without declaring it
        "tqdm",
        "pyarrow",  # parquet input of `minitron data prepare`
        "lm-eval[hf]>=0.4.9,<0.5",  # benchmarks (task configs used as they are)
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6"],
        # Reading the embedded SmolLM2 GGUF (default run, slow tests).
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
        "launch": ["nemo-run", "leptonai<0.47"],
    },
    entry_points={"console_scripts": ["minitron=minitron_nemo.cli:main"]},
)
