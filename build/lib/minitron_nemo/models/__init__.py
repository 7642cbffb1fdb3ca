"""Architecture description, megatron-core model building and HF family maps."""
