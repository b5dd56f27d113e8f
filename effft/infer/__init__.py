"""Applying a trained run: predict, explain, export."""
