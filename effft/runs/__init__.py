"""Runs: building from a recipe (build.py), fit, test, the run directory (layout.py), processes (jobs.py)."""
