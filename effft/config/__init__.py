"""Recipes: the schema of every section (schema.py) and reading YAML into it (load.py)."""
