"""minitron-nemo: structured pruning + distillation of LLMs on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="minitron-nemo",
    version="0.1.0",
    description="Prune and distill LLMs the Minitron way on megatron-core (HF in, HF out).",
    packages=find_packages(include=["minitron_nemo", "minitron_nemo.*"]),
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
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6"],
        # Reading the embedded SmolLM2 GGUF (default run, slow tests).
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
        "launch": ["nemo-run", "leptonai<0.47"],
    },
    entry_points={"console_scripts": ["minitron=minitron_nemo.cli:main"]},
)
