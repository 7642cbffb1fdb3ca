"""minitron-nemo: prune and distill LLMs the Minitron way on megatron-core."""

__version__ = "0.1.0"
