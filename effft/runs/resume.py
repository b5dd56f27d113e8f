"""`effft fit --resume`: what a resumed run can change, and whether it has anything left to do.

A run resumes from `checkpoints/last.ckpt`: its weights, the state of its optimiser, schedule and
callbacks, and the epoch it reached. What made those cannot change under it: the model, the
data and their split, the seed, the fine-tuning schedule, the optimiser and its schedule, the
loss, the metric that picks the best checkpoint, EMA. Left as they are, a changed learning rate
would be recorded while the restored optimiser trains with the old one. How long and how the
run trains (the `trainer` arguments, the batch size, the data loaders, the cache), where it logs
and what is reported at its end can change, and each change is said.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.schema import Recipe
from ..errors import EffftError, RecipeError
from .layout import CHECKPOINTS, read_checkpoint

# recipe keys (and sections) a resumed run takes as they are given now
APPLIES = ("name", "output_dir", "trainer", "data.batch_size", "data.num_workers", "data.cache", "data.cache_dir",
           "model.channels_last", "model.compile", "model.sync_batchnorm", "metrics", "report", "loggers")
UNSAID = ("name", "output_dir")  # they led to this run directory: nothing to say about them
_PATHS = ("data.root", "data.cache_dir", "output_dir")  # the same folder may be spelled differently
_UNSET = object()


@dataclass
class Resume:
    """A resume that may go ahead: the recipe to train with, the checkpoint to start from, and what
    it takes from the recipe given now."""

    recipe: Recipe
    last: Path
    epochs_done: int
    global_step: int
    changes: list[str] = field(default_factory=list)  # "trainer.max_epochs: 2 -> 4"
    finished: str | None = None  # why nothing is left to train (the evaluation may still be)


def plan_resume(recipe: Recipe, run_dir: Path) -> Resume:
    """Check that the run in `run_dir` can be resumed under `recipe` (see the module)."""
    last = run_dir / CHECKPOINTS / "last.ckpt"
    if not last.exists():
        raise EffftError(f"--resume: {last} does not exist (the run stopped before its first epoch ended); "
                         "start it again with --overwrite")
    # a file that is no checkpoint (or a pickle with code in it): refused here, not inside Lightning
    checkpoint = read_checkpoint(last, advice="the run cannot go on from it: start it again with --overwrite")
    meta = checkpoint.get("effft")
    if not isinstance(meta, dict) or not isinstance(meta.get("recipe"), dict):
        raise EffftError(f"--resume: {last} was not written by effft fit (no recipe inside); start the run again "
                         "with --overwrite")
    recipe = _with_found_lr(recipe, meta)
    before, now = _flat(_as_today(meta["recipe"])), _flat(recipe.to_dict())
    changed = [key for key in sorted(before.keys() | now.keys())
               if not _same(key, before.get(key, _UNSET), now.get(key, _UNSET))]
    refused = [key for key in changed if not _applies(key)]
    if refused:
        shown = "; ".join(f"{key}: {_show(before.get(key, _UNSET))} in the run, {_show(now.get(key, _UNSET))} now"
                          for key in refused)
        raise RecipeError(f"--resume: the recipe differs from the one the run in {run_dir} was trained with, in "
                          f"what a resumed run cannot change ({shown}). Put them back to resume the run (its recipe "
                          f"is {run_dir / 'recipe.yaml'}), or start a new run: with --overwrite, or under another name "
                          "(--set name=...)")
    changes = [f"{key}: {_show(before.get(key, _UNSET))} -> {_show(now.get(key, _UNSET))}"
               for key in changed if not key.startswith(UNSAID)]
    done = _epochs_done(checkpoint)
    return Resume(recipe=recipe, last=last, epochs_done=done, global_step=int(checkpoint.get("global_step", 0)),
                  changes=changes, finished=_finished(checkpoint, recipe, done))


def finished_message(resume: Resume, run_dir: Path, *, command: str) -> str:
    """What to tell a user who resumes a finished run."""
    longer = (f"to train it longer, resume it with more epochs: {command} --resume --set trainer.max_epochs=N "
              f"(N above {resume.epochs_done})")
    if "stopped early" in (resume.finished or ""):
        longer = ("early stopping ended it, and its patience is restored with it: to train longer, start a new "
                  "run with a larger monitor.early_stopping_patience")
    return (f"the run in {run_dir} is finished: {resume.finished}; its results are in {run_dir / 'metrics.json'}. "
            f"Nothing was changed. To evaluate it again: effft test {run_dir}; {longer}.")


# ---------------------------------------------------------------------------- comparing recipes


def _with_found_lr(recipe: Recipe, meta: dict[str, Any]) -> Recipe:
    """A run started with --find-lr trained with the finder's pick: the recipe's own rate (the
    one given then) means that pick."""
    found = meta.get("lr_finder")
    if isinstance(found, dict) and recipe.optimizer.lr == found.get("given") and "picked" in found:
        optimizer = recipe.optimizer.model_copy(update={"lr": float(found["picked"])})
        return recipe.model_copy(update={"optimizer": optimizer})
    return recipe


def _as_today(raw: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's recipe with today's defaults filled in (an older effft may have written
    fewer keys); as written where it no longer validates."""
    from ..config.load import validate

    try:
        return validate(copy.deepcopy(raw), source="the checkpoint's recipe").to_dict()
    except EffftError:
        return raw


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if key in _PATHS and isinstance(a, str) and isinstance(b, str):
        return os.path.abspath(a) == os.path.abspath(b)
    return False


def _applies(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in APPLIES)


def _show(value: Any) -> str:
    return "not set" if value is _UNSET else repr(value)


# ---------------------------------------------------------------------------- what is left to do


def _epochs_done(checkpoint: dict[str, Any]) -> int:
    """Epochs trained to their end: last.ckpt is saved as an epoch ends."""
    progress = (((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get("current")
    if isinstance(progress, dict) and isinstance(progress.get("processed"), int):
        return progress["processed"]
    return int(checkpoint.get("epoch", -1)) + 1


def _finished(checkpoint: dict[str, Any], recipe: Recipe, done: int) -> str | None:
    """Why the run has nothing left to train under `recipe`, or None."""
    max_steps = recipe.trainer.get("max_steps", -1)
    max_epochs = recipe.trainer.get("max_epochs", 10)
    if max_epochs is None:  # Lightning's default where neither is given
        max_epochs = 1000 if max_steps in (None, -1) else -1
    if max_epochs != -1 and done >= max_epochs:
        return f"it has trained {done} epochs, and trainer.max_epochs is {max_epochs}"
    steps = int(checkpoint.get("global_step", 0))
    if max_steps not in (None, -1) and steps >= max_steps:
        return f"it has taken {steps} steps, and trainer.max_steps is {max_steps}"
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not (key.startswith("EarlyStopping") and isinstance(state, dict)):
            continue
        # Lightning before 2.6 kept no reason, only the epoch it stopped in
        stopped = state["stopping_reason"] != 0 if "stopping_reason" in state else state.get("stopped_epoch", 0) > 0
        if stopped:
            return (f"it stopped early after {done} epochs: {recipe.monitor.metric} had not improved for "
                    f"{state.get('patience')} epochs (monitor.early_stopping_patience)")
    return None
