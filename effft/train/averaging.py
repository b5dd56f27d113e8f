"""EMA of the weights with Lightning's `EMAWeightAveraging`.

Lightning's callback keeps the average, validates with it and writes it as the checkpoint's
weights (`state_dict`), so the best checkpoint, `effft test`, `predict` and `export` all use
the averaged weights. After training the average is also what the module holds; from then on
evaluation loads checkpoints, which hold it already, so the callback stops swapping.
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

log = logging.getLogger(__name__)

SPAN = 0.1  # auto: the average spans this part of the run's optimiser steps
EVERY = 2  # auto, for runs of LONG steps or more: the average is updated every EVERY steps
LONG = 200


def planned_decay(total_steps: int) -> float:
    """The decay whose average spans about SPAN of `total_steps` (1 / (1 - decay) steps), and
    never fewer than 2 steps."""
    return 1.0 - 1.0 / max(2.0, SPAN * total_steps)


class ExponentialAverage(EMAWeightAveraging):
    """EMA of all weights and BatchNorm statistics, updated after every optimiser step. `decay`
    "auto" is planned from the trainer's steps when fitting starts."""

    def __init__(self, *, decay: float | str) -> None:
        self.planned = decay == "auto"
        super().__init__(decay=0.5 if self.planned else float(decay), use_buffers=True)
        self._use(0.5 if self.planned else float(decay))

    def _use(self, decay: float) -> None:
        # the averaging of all tensors at once (torch's foreach lerp), not one Python call per
        # tensor as Lightning's per-parameter function does: the same numbers, a fraction of the time
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay=decay)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.planned:
            self.plan(int(trainer.estimated_stepping_batches))
        super().setup(trainer, pl_module, stage)

    def plan(self, steps: int) -> float:
        """Set the decay (and how often to update) for a run of `steps` optimiser steps; returns
        the decay of one update."""
        decay = planned_decay(steps)
        if steps >= LONG:
            # the same span from half the updates: each one costs a walk over every tensor
            self.update_every_n_steps = EVERY
            decay = decay ** EVERY
        self._use(decay)
        log.debug("ema.decay auto: %.4f every %d step(s) for %d steps", decay, self.update_every_n_steps, steps)
        return decay

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._average_model = None  # validation and test after training load checkpoints (see above)
