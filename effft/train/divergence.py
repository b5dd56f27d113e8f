"""A run whose numbers stopped being numbers ends there, with what to change.

A learning rate too high for the data (or for `trainer.precision`) makes the training loss, then
the weights, infinite or NaN. Training on would only overwrite good checkpoints with NaN ones and
fill the report with figures of NaN outputs (or fail in it). So the run stops at the first
training step whose loss is not finite, or at the first validation whose outputs are not (the
weights can be finite while a BatchNorm's statistics overflow), before that validation can choose
a checkpoint: `TrainingDiverged`, an error that names the epoch, the step, the learning rate and
the gradient clipping to try. The run directory keeps the epochs before it, as an interrupted run
does. Outside a fit (`effft test` of a checkpoint whose weights are broken) outputs that are not
finite are one error too.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback

from ..errors import EffftError


class TrainingDiverged(EffftError):
    """The training loss or the val outputs of a fit are no longer finite numbers."""


class Divergence(Callback):
    """Raises `TrainingDiverged` at a training step whose loss is not finite (see the module)."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            raise TrainingDiverged(_message(trainer, pl_module, f"the training loss became {float(loss):g} at step "
                                                                f"{trainer.global_step}"))


def check_outputs(pl_module: Any, outputs: torch.Tensor, split: str) -> None:
    """Raises where a split's outputs (logits, embeddings) are not all finite; called by the
    modules before they compute any figure of them. In a fit's validation that is before the
    checkpoint callbacks can keep them: `TrainingDiverged`. Elsewhere (`effft test` of a
    checkpoint whose weights are broken) an `EffftError` that says the checkpoint cannot be
    evaluated, rather than figures of NaN or a failure in the report."""
    from lightning.pytorch.trainer.states import TrainerFn

    trainer = pl_module.trainer
    if trainer.sanity_checking or not outputs.numel():
        return
    bad = int((~torch.isfinite(outputs.reshape(len(outputs), -1))).any(dim=1).sum())
    if not bad:
        return
    what = f"the model's outputs for {bad} of {len(outputs)} {split} images are not finite numbers"
    if split == "val" and trainer.state.fn == TrainerFn.FITTING:
        raise TrainingDiverged(_message(trainer, pl_module, what))
    raise EffftError(f"{what}: the checkpoint's weights cannot be evaluated (a run that diverged, or weights "
                     "changed since); evaluate a checkpoint of a run that did not diverge, or fit again with a "
                     f"lower optimizer.lr (it was {pl_module.recipe.optimizer.lr:g})")


def _message(trainer: Any, pl_module: Any, what: str) -> str:
    recipe = pl_module.recipe
    epoch = trainer.current_epoch + 1
    clip = recipe.trainer.get("gradient_clip_val")
    clipping = (f"lower trainer.gradient_clip_val (it is {clip:g})" if clip else
                "set trainer.gradient_clip_val (1.0 is a common start)")
    return (f"training diverged in epoch {epoch}: {what}. Lower optimizer.lr (it is {recipe.optimizer.lr:g}), "
            f"raise scheduler.warmup_epochs or {clipping}, and start again with --overwrite; "
            f"{recipe.run_dir} keeps the epochs before it and was not evaluated")
