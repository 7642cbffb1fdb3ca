"""Evaluation: held-out LM loss / perplexity, zero-shot multiple-choice accuracy."""
