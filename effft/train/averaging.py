"""EMA of the weights with Lightning's `EMAWeightAveraging`.

Lightning's callback keeps the average, validates with it and writes it as the checkpoint's
weights (`state_dict`), so the best checkpoint, `effft test`, `predict` and `export` all use
the averaged weights. After training the average is also what the module holds; from then on
evaluation loads checkpoints, which hold it already, so the callback stops swapping.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging


class ExponentialAverage(EMAWeightAveraging):
    """EMA of all weights and BatchNorm statistics, updated after every optimiser step."""

    def __init__(self, *, decay: float) -> None:
        super().__init__(decay=decay, use_buffers=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._average_model = None  # validation and test after training load checkpoints (see above)
