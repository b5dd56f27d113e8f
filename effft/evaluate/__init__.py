"""Evaluation: metrics with torchmetrics."""
