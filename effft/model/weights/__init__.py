"""Where weights come from (hub.py), how other layouts are renamed (convert.py), loading (load.py)."""
