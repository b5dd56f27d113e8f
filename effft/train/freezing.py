"""Which parts of the network train when: the fine-tuning strategies.

The network is seen as a list of stages in depth order (stem, the seven block stages, the
head convolution, the classifier). A strategy says how many stages, counted from the top, are
trainable at a given epoch; the rest are frozen: no gradients, and their BatchNorm layers
normalise with their stored statistics (unless `train_bn`). All stages are in the optimiser
from the start (frozen ones simply get no gradients), so unfreezing never changes the
parameter groups, and a resumed run has exactly the groups and optimiser state it was stopped
with. That is why this is a plain callback and not Lightning's `BaseFinetuning`, whose
bookkeeping adds parameter groups as stages thaw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
from torch import nn

if TYPE_CHECKING:
    from ..config.schema import FinetuneConfig


def trainable_stages(cfg: FinetuneConfig, epoch: int, n_stages: int) -> int:
    """How many stages, from the top, train at `epoch` (the classifier always does)."""
    if cfg.strategy == "full":
        return n_stages
    if cfg.strategy == "linear_probe":
        return 1
    if cfg.strategy == "freeze_then_unfreeze":
        return 1 if epoch < cfg.unfreeze_epoch else n_stages
    reached = sum(1 for m in cfg.milestones if epoch >= m)  # gradual
    return min(n_stages, 1 + reached)


def _batchnorms(stages: list[nn.Module]) -> list[nn.Module]:
    return [m for s in stages for m in s.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Freezing(L.Callback):
    """Freezes and unfreezes the stages of `pl_module.model` as the strategy says, at the start
    of every training epoch."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.frozen_bn: list[nn.Module] = []

    def apply(self, pl_module: L.LightningModule, epoch: int) -> None:
        """Set what trains at `epoch` (the learning-rate finder calls this for epoch 0)."""
        stages = pl_module.model.stages()
        k = min(trainable_stages(self.cfg, epoch, len(stages)), len(stages) - self.cfg.freeze_bottom)
        frozen, trainable = stages[: len(stages) - k], stages[len(stages) - k:]
        for stage in trainable:
            for p in stage.parameters():
                p.requires_grad = True
        for m in _batchnorms(trainable):  # unfrozen now: back to training mode with the rest
            m.train(pl_module.training)
            m.track_running_stats = True
        for stage in frozen:
            for p in stage.parameters():
                p.requires_grad = False
        frozen_bn = _batchnorms(frozen)
        for m in frozen_bn:
            # train_bn keeps only the statistics moving: the BatchNorm weights stay frozen too
            m.track_running_stats = self.cfg.train_bn
        self.frozen_bn = [] if self.cfg.train_bn else frozen_bn
        self._hold_bn_statistics()

    def _hold_bn_statistics(self) -> None:
        # Frozen BatchNorm normalises with its stored statistics and leaves them unchanged.
        for m in self.frozen_bn:
            m.eval()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Lightning puts the whole module back in train mode after each validation.
        self._hold_bn_statistics()
