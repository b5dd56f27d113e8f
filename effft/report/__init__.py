"""Figures, tables and summaries a run leaves for people to read."""
