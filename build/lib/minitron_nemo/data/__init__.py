"""Data: offline model/text sources, tokenization, indexed datasets, calibration sampling."""
