"""Training: the LightningModule (module.py) and what trains when (freezing.py)."""
