"""`effft fit`: train, validate and test as a recipe says, into a run directory.

Nothing is written until the recipe, the data and the weights have been checked, so a mistake
leaves no half-made run directory behind.
"""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import yaml

from ..config.schema import Recipe
from ..console import console
from ..errors import EffftError
from ..paths import atomic_write, can_make_folder
from .build import Built, build, make_trainer, recipe_weights
from .jobs import distributed_job, launched_first
from .layout import CHECKPOINTS
from .results import show_results, write_results

log = logging.getLogger(__name__)


def _prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Check the run directory may be used; returns last.ckpt when resuming."""
    can_make_folder(run_dir, what="the run directory (output_dir/name)")
    last = run_dir / CHECKPOINTS / "last.ckpt"
    busy = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not last.exists():
            raise EffftError(f"--resume: {last} does not exist (the run stopped before its first epoch ended); "
                             "start it again with --overwrite")
        return last
    if busy and not overwrite:
        raise EffftError(f"run directory {run_dir} exists and is not empty: pass --resume to continue it, "
                         "--overwrite to start it again, or give the run another name (--set name=...)")
    return None


def fit(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, find_lr: bool = False,
        quiet: bool = False) -> Path:
    """Train, validate and test as the recipe says; returns the run directory."""
    import lightning as L

    run_dir = recipe.run_dir
    # Under DDP every process runs this command; the first one alone checks and writes the run
    # directory (the others start once it is made, when Lightning launches them).
    first = launched_first()
    last = _prepare_run_dir(run_dir, resume=resume, overwrite=overwrite and first) if first else (
        run_dir / CHECKPOINTS / "last.ckpt" if resume else None)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    splits_file = run_dir / "splits.csv" if resume and (run_dir / "splits.csv").exists() else None
    built = build(recipe, splits_file=splits_file, weights=recipe_weights(recipe), progress=not quiet)
    dm, module = built.datamodule, built.module
    trainer = make_trainer(recipe, run_dir, task=built.data.task, classes=built.data.classes, quiet=quiet)
    # Everything checked: from here on the run directory is written.
    with distributed_job(trainer):
        if first:
            if overwrite and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            built.data.write_run_files(run_dir)
            if find_lr:
                recipe = _find_lr(trainer, built, run_dir)
            with atomic_write(run_dir / "recipe.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        if recipe.model.compile:
            import torch

            module.model = torch.compile(module.model)
        with warnings.catch_warnings():
            # the fine-tuning schedule keeps frozen stages (and their BatchNorm statistics) in eval
            # mode on purpose; Lightning's note that it found modules in eval mode is not news
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            # small data sets: the epoch's mean loss is logged whatever the step logging interval
            warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
            trainer.fit(module, datamodule=dm, ckpt_path=last, weights_only=True)
        best = trainer.checkpoint_callback.best_model_path or str(run_dir / CHECKPOINTS / "last.ckpt")
        if best and Path(best).exists() and Path(best).name != "best.ckpt":
            shutil.copyfile(best, run_dir / CHECKPOINTS / "best.ckpt")
        results: dict[str, dict[str, float]] = {}
        trainer.validate(module, datamodule=dm, ckpt_path=best, weights_only=True, verbose=False)
        results["val"] = module.results.get("val", {})
        if built.data.split_items("test"):
            trainer.test(module, datamodule=dm, ckpt_path=best, weights_only=True, verbose=False)
            results["test"] = module.results.get("test", {})
        if trainer.is_global_zero:
            write_results(run_dir, built, results)
            show_results(results, run_dir, built.weights)
    return run_dir


FIND_LR_STEPS = (24, 100)  # fewest steps that give a usable curve (the pick skips the first 10), most


def _find_lr(trainer: Any, built: Built, run_dir: Path) -> Recipe:
    from lightning.pytorch.tuner import Tuner

    from ..train.freezing import Freezing

    # the finder replaces the callbacks: freeze as the first epoch will, so it tunes what trains
    Freezing(built.recipe.finetune).apply(built.module, 0)
    built.datamodule.setup("fit")
    per_epoch = max(1, len(built.datamodule.train_dataloader()))
    max_epochs = trainer.fit_loop.max_epochs
    steps = min(FIND_LR_STEPS[1], max(FIND_LR_STEPS[0], per_epoch * max(1, max_epochs or 1)))
    trainer.fit_loop.max_epochs = max(max_epochs or 1, math.ceil(steps / per_epoch))  # small data: more epochs
    try:
        finder = Tuner(trainer).lr_find(built.module, datamodule=built.datamodule, attr_name="lr",
                                        update_attr=True, num_training=steps)
    finally:
        trainer.fit_loop.max_epochs = max_epochs
    pick = finder.suggestion() if finder is not None else None
    if pick is None:
        raise EffftError("the learning-rate finder found no clear pick (loss did not fall); set optimizer.lr yourself")
    fig = finder.plot(suggest=True)
    with atomic_write(run_dir / "lr_find.png") as tmp:
        fig.savefig(tmp, format="png")
    console.print(f"learning-rate finder: picked optimizer.lr = {pick:.3g} (plot: {run_dir / 'lr_find.png'})", markup=False)
    recipe = built.recipe.model_copy(update={"optimizer": built.recipe.optimizer.model_copy(update={"lr": pick})})
    built.module.recipe = recipe
    return recipe
