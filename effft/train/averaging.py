"""EMA of the weights with Lightning's `EMAWeightAveraging`.

Lightning's callback keeps the average, validates with it and writes it as the checkpoint's
weights (`state_dict`), so the best checkpoint, `effft test`, `predict` and `export` all use
the averaged weights. After training the average is also what the module holds; from then on
evaluation loads checkpoints, which hold it already, so the callback stops swapping.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

log = logging.getLogger(__name__)

SPAN = 0.1  # auto: the average spans this part of the run's optimiser steps
EVERY = 2  # auto, for runs of LONG steps or more: the average is updated every EVERY steps
LONG = 200


def planned_decay(total_steps: int) -> float:
    """The decay whose average spans about SPAN of `total_steps` (1 / (1 - decay) steps), and
    never fewer than 2 steps."""
    return 1.0 - 1.0 / max(2.0, SPAN * total_steps)


class ListedAverage(AveragedModel):
    """torch's `AveragedModel` that lists its tensors and the model's once, on the first
    update, grouped by device and dtype. torch's own update walks both module trees and detaches
    every tensor at each call: on a small network that walk cost more than the averaging.

    The listed tensors are the parameter and buffer objects themselves, so moving the model (which
    swaps their data in place) keeps them right; effft never replaces a module during a fit. Where
    the average and the model sit on different devices the update is torch's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None

    def _tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return list(itertools.chain(module.parameters(), module.buffers() if self.use_buffers else []))

    def _group(self, model: torch.nn.Module) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None:
        ours, theirs = self._tensors(self.module), self._tensors(model)
        if len(ours) != len(theirs) or any(a.device != b.device or a.dtype != b.dtype or a.shape != b.shape
                                           for a, b in zip(ours, theirs)):
            return None
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for a, b in zip(ours, theirs):
            pair = groups.setdefault((a.device, a.dtype), ([], []))
            pair[0].append(a)
            pair[1].append(b)
        return list(groups.values())

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        if self.multi_avg_fn is None:
            return super().update_parameters(model)
        if self._groups is None:
            self._groups = self._group(model)
            if self._groups is None:
                return super().update_parameters(model)
        first = bool(self.n_averaged == 0)
        for ours, theirs in self._groups:
            if first:
                torch._foreach_copy_(ours, theirs)
            else:
                self.multi_avg_fn(ours, theirs, self.n_averaged)
        self.n_averaged += 1


class ExponentialAverage(EMAWeightAveraging):
    """EMA of all weights and BatchNorm statistics, updated after every optimiser step. `decay`
    "auto" is planned from the trainer's steps when fitting starts."""

    def __init__(self, *, decay: float | str) -> None:
        self.planned = decay == "auto"
        first = 0.5 if self.planned else float(decay)  # auto: replaced by the plan when fitting starts
        super().__init__(decay=first, use_buffers=True)
        self._use(first)

    def _use(self, decay: float) -> None:
        # the averaging of all tensors at once (torch's foreach lerp), not one Python call per
        # tensor as Lightning's per-parameter function does: the same numbers, a fraction of the time
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay=decay)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return super().setup(trainer, pl_module, stage)
        if self.planned:
            self.plan(int(trainer.estimated_stepping_batches))
        # what Lightning's setup makes, as the listed average (effft's module has no configure_model)
        self._average_model = ListedAverage(model=pl_module, device=self._device or pl_module.device,
                                            use_buffers=self._use_buffers, **self._kwargs)

    def plan(self, steps: int) -> float:
        """Set the decay (and how often to update) for a run of `steps` optimiser steps; returns
        the decay of one update."""
        decay = planned_decay(steps)
        if steps >= LONG:
            # the same span from half the updates: each one is a pass over every weight and buffer
            self.update_every_n_steps = EVERY
            decay = decay ** EVERY
        self._use(decay)
        log.debug("ema.decay auto: %.4f every %d step(s) for %d steps", decay, self.update_every_n_steps, steps)
        return decay

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._average_model = None  # validation and test after training load checkpoints (see above)
