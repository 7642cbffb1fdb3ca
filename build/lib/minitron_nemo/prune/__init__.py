"""Structured pruning: activation importance, architecture selection, slicing, depth."""
