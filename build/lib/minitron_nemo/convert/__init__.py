"""HF <-> megatron-core conversion (names from models/families, TP split in transforms.py)."""
