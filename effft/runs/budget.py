"""`trainer.budget`: a time for the whole run, which effft plans its epochs to fit.

Before training, a few steps are timed on a copy of the model with the run's own batches (data
loading included), and an evaluation batch too. From them: what an epoch costs (training and
validation), and what comes after the last one (the final validation, the test, the reports).
The epochs that fit in what is left of the budget become `trainer.max_epochs`, so the
learning-rate schedule, which is planned from it, runs to its end. A guard stops training at the
end of an epoch when the next one would no longer fit (the machine slowed down), so the run
always ends with its evaluation and reports written.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

TIMED_STEPS = 3  # after one step to warm up
REPORT_SECONDS = 8.0  # figures, the error grid and the files of the report, on a small CPU
MARGIN = 0.05  # of the budget, kept free for what the estimate misses


def process_age() -> float:
    """Seconds since this process started (its imports included, where the system tells): the
    command line's budget counts from there."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0  # not Linux: the budget counts from the call to fit


def _time_steps(built: Any) -> tuple[float, float]:
    """(seconds a training batch takes, data included; seconds an evaluation batch takes)."""
    dm = built.datamodule
    dm.setup("fit")
    model = copy.deepcopy(built.module.model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-8)
    loss_fn = built.module.loss_fn
    batches = iter(dm.train_dataloader())
    times = []
    for _ in range(TIMED_STEPS + 1):
        start = time.perf_counter()
        try:
            x, y, _ = next(batches)
        except StopIteration:
            break
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    train = sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
    model.eval()
    x, _, _ = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        model(x)  # warm-up
        start = time.perf_counter()
        model(x)
    return train, time.perf_counter() - start


def plan_epochs(built: Any, *, budget: float, most: int | None, started: float) -> tuple[int, float]:
    """(epochs that fit in `budget` seconds from `started` (a `time.perf_counter()` value), at
    most `most`; the seconds expected for what follows the last epoch)."""
    from ..data.samplers import batch_count

    data, size = built.data, built.recipe.data.batch_size
    train_step, eval_step = _time_steps(built)
    val_batches = math.ceil(len(data.split_items("val")) / size)
    test_batches = math.ceil(len(data.split_items("test")) / size)
    epoch = batch_count(len(data.split_items("train")), size) * train_step + val_batches * eval_step
    after = (val_batches + test_batches) * eval_step + REPORT_SECONDS
    left = budget * (1 - MARGIN) - (time.perf_counter() - started) - after
    epochs = max(1, math.floor(left / epoch)) if epoch > 0 else 1
    if most is not None:
        epochs = min(epochs, most)
    log.info("trainer.budget %.0f s: an epoch takes about %.1f s and the evaluation after training %.1f s; "
             "planned %d epoch(s)", budget, epoch, after, epochs)
    return epochs, after


class BudgetGuard(L.Callback):
    """Stops training at the end of an epoch when another would overrun the budget."""

    def __init__(self, *, budget: float, after: float, started: float) -> None:
        self.budget, self.after, self.started = budget, after, started
        self._epoch_started = 0.0
        self._longest = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._epoch_started:
            return
        self._longest = max(self._longest, time.perf_counter() - self._epoch_started)
        if time.perf_counter() - self.started + self._longest + self.after > self.budget:
            log.warning("trainer.budget: another epoch would overrun the %.0f s budget; training ends here",
                        self.budget)
            trainer.should_stop = True
