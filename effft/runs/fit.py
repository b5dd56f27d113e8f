"""`effft fit`: train, validate and test as a recipe says, into a run directory.

Nothing is written until the recipe, the data and the weights have been checked, so a mistake
leaves no half-made run directory behind. While a run writes its directory it holds it (an OS
lock), so a second `effft fit` of the same run is refused instead of mixing its files in.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

from ..config.schema import Recipe
from ..config.trainer import BUDGET
from ..config.trainer import seconds as budget_seconds
from ..console import console
from ..errors import EffftError, RecipeError
from ..paths import atomic_write, can_make_folder
from .build import (Built, build, check_fit_plan, check_one_process, check_processes, make_trainer,
                    recipe_weights)
from .jobs import distributed_job, launched_first
from .layout import CHECKPOINTS, clear_run_dir, locked, made_by_fit, run_dir_busy, update_checkpoint_meta
from .embedding import baseline_runs, shown_results, write_evaluation
from .results import jsonable, show_results, write_training_facts
from .resume import Resume, finished_message, plan_resume
from .writing import trim_history

log = logging.getLogger(__name__)


def _prepare_run_dir(recipe: Recipe, *, resume: bool, overwrite: bool) -> Resume | None:
    """Check the run directory may be used; what a resume will do (None for a new run)."""
    run_dir = recipe.run_dir
    can_make_folder(run_dir, what="the run directory (output_dir/name)")
    if resume:
        return plan_resume(recipe, run_dir)
    if run_dir_busy(run_dir) and not overwrite:
        raise EffftError(f"run directory {run_dir} exists and is not empty: pass --resume to continue it, "
                         "--overwrite to start it again, or give the run another name (--set name=...)")
    if run_dir_busy(run_dir) and not made_by_fit(run_dir):
        raise EffftError(f"--overwrite: {run_dir} is not a run directory made by effft fit (it has no recipe.yaml, "
                         "splits.csv or classes.json), so it is not deleted: give the run another name "
                         "(--set name=...) or another output_dir")
    return None


def _next_step(run_dir: Path, command: str) -> str:
    """What to do after the run was stopped from outside (Ctrl-C, SIGTERM)."""
    if (run_dir / CHECKPOINTS / "last.ckpt").exists():
        return f"the run in {run_dir} is unfinished; continue it with: {command} --resume"
    return f"the run in {run_dir} stopped before its first epoch ended; start it again with: {command} --overwrite"


def fit(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, find_lr: bool = False,
        quiet: bool = False, command: str = "effft fit RECIPE", started: float | None = None,
        splits_file: Path | None = None, trial: list[Any] | None = None) -> Path:
    """Train, validate and test as the recipe says; returns the run directory. `command`: the
    command line that started it (without --resume or --overwrite), for the messages that say
    how to go on. `started`: the `time.perf_counter()` that `trainer.budget` counts from (the
    call itself where not given). `splits_file`: a splits.csv to split a new run by (as
    `effft cv` gives each fold); a resumed run keeps its own. `trial`: the run is a trial of
    `effft tune`, with these extra Trainer callbacks (its pruning): it is judged on val alone, so
    the test split is not evaluated, and only metrics.json is written (no report)."""
    import lightning as L

    started = time.perf_counter() if started is None else started
    if resume and find_lr:
        raise RecipeError("--find-lr picks the learning rate of a new run; a resumed run keeps its own: drop --find-lr")
    run_dir, given = recipe.run_dir, recipe
    # Under DDP every process runs this command; the first one alone checks and writes the run
    # directory (the others start once it is made, when Lightning launches them).
    first = launched_first()
    plan = _prepare_run_dir(recipe, resume=resume, overwrite=overwrite) if first else None
    if plan is not None:
        if _finished(plan, run_dir, command=command):
            return run_dir
        recipe = plan.recipe
    last = run_dir / CHECKPOINTS / "last.ckpt" if resume else None
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    if resume and (run_dir / "splits.csv").exists():
        splits_file = run_dir / "splits.csv"
    built = build(recipe, splits_file=splits_file, weights=recipe_weights(recipe), progress=not quiet)
    check_fit_plan(recipe, built.data, image_size=built.spec.size)
    dm, module = built.datamodule, built.module
    if recipe.task == "embedding":
        baseline_runs(recipe, built.data)  # refused now, not after training, where one saw the test people
        module.start_from_data = last is None  # a resumed run has its head
    guard = None
    if budget_seconds(recipe.trainer.get(BUDGET)) and not resume:
        recipe, guard = _plan_budget(recipe, built, started)
    # From here on the run directory is held (and the Trainer's loggers may make their files).
    with ExitStack() as held:
        if first:
            held.enter_context(locked(run_dir))
            # again, now that no other run can: one may have written the directory meanwhile
            plan = _prepare_run_dir(given, resume=resume, overwrite=overwrite)
            if plan is not None and _finished(plan, run_dir, command=command):
                return run_dir
        trainer = make_trainer(recipe, run_dir, task=built.data.task, classes=built.data.classes, quiet=quiet)
        check_processes(trainer, built.data)
        if find_lr:
            check_one_process(trainer, "--find-lr: the finder",
                              "find the rate on one device with --set trainer.devices=1 --set trainer.max_epochs=1 "
                              "--find-lr (it prints the rate it picks), then fit on them all with --set "
                              "optimizer.lr=<that rate> --overwrite")
        if guard is not None:
            trainer.callbacks.append(guard)
        trainer.callbacks.extend(trial or [])
        # Everything checked: from here on the run directory is written.
        with distributed_job(trainer, next_step=lambda: _next_step(run_dir, command)):
            if first:
                if plan is not None:
                    _say_resume(plan, run_dir, quiet=quiet)
                    # the rows an interrupted epoch logged after last.ckpt are logged again
                    trim_history(run_dir / "logs" / "csv" / "metrics.csv", step=plan.global_step)
                elif overwrite:
                    clear_run_dir(run_dir)
                built.data.write_run_files(run_dir)
                if find_lr:
                    with lightning_notes_off():
                        recipe = _find_lr(trainer, built, run_dir)
                with atomic_write(run_dir / "recipe.yaml") as tmp:
                    tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            if recipe.model.compile:
                import torch

                module.model = torch.compile(module.model)
            with lightning_notes_off():
                trainer.fit(module, datamodule=dm, ckpt_path=last, weights_only=True)
            best = trainer.checkpoint_callback.best_model_path or str(run_dir / CHECKPOINTS / "last.ckpt")
            if best and Path(best).exists() and Path(best).name != "best.ckpt":
                with atomic_write(run_dir / CHECKPOINTS / "best.ckpt") as tmp:
                    shutil.copyfile(best, tmp)
            results: dict[str, dict[str, float]] = {}
            with warnings.catch_warnings():
                # the best checkpoint holds the averaged weights already (train/averaging.py)
                warnings.filterwarnings("ignore", message=r".*WeightAveraging callback, but loading a checkpoint")
                trainer.validate(module, datamodule=dm, ckpt_path=best, weights_only=True, verbose=False)
                _decide_on_val(trainer, module, Path(best), calibrate=recipe.metrics.calibration == "temperature")
                results["val"] = module.results.get("val", {})
                if built.data.split_items("test") and trial is None:
                    trainer.test(module, datamodule=dm, ckpt_path=best, weights_only=True, verbose=False)
                    results["test"] = module.results.get("test", {})
            if trainer.is_global_zero:
                write_training_facts(run_dir, weights=built.weights, epochs=trainer.current_epoch,
                                     seconds=time.perf_counter() - started,
                                     image_sizes=built.data.image_size_stats())
                if trial is not None:
                    with atomic_write(run_dir / "metrics.json") as tmp:
                        tmp.write_text(json.dumps(jsonable(results), indent=2))
                else:
                    written = write_evaluation(run_dir, built, results)
                    show_results(shown_results(built, results, written), run_dir, built.weights,
                                 intervals=written.get("intervals"))
            # under DDP the other processes return once the run directory is whole: what runs
            # next in them (effft cv's next fold, its pooling) may read it
            trainer.strategy.barrier("run written")
    return run_dir


@contextmanager
def lightning_notes_off() -> Iterator[None]:
    """Lightning's warnings that say nothing a user of effft can act on, off while training."""
    with warnings.catch_warnings():
        # the fine-tuning schedule keeps frozen stages (and their BatchNorm statistics) in eval
        # mode on purpose; Lightning's note that it found modules in eval mode is not news
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # small data sets: the epoch's mean loss is logged whatever the step logging interval
        warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
        # a resumed run writes its checkpoints where they were: as it should
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        yield


def _plan_budget(recipe: Recipe, built: Built, started: float) -> tuple[Recipe, Any]:
    """The recipe with the epochs that fit `trainer.budget` (see runs/budget.py), and the guard
    that ends training early should the machine slow down."""
    from .budget import BudgetGuard, plan_epochs

    budget = budget_seconds(recipe.trainer[BUDGET])
    epochs, after = plan_epochs(built, budget=budget, most=recipe.trainer.get("max_epochs"),
                                       started=started)
    planned = recipe.model_copy(update={"trainer": {**recipe.trainer, "max_epochs": epochs}})
    built.module.recipe = planned  # the checkpoints record the plan
    return planned, BudgetGuard(budget=budget, after=after, started=started)


def _decide_on_val(trainer: Any, module: Any, best: Path, *, calibrate: bool) -> None:
    """What the val split decides after training: the temperature (and the binary threshold again,
    on the calibrated probabilities) and the binary operating points; written into the best
    checkpoint, which test, predict and export read. Every process decides on the same gathered
    val predictions; the first alone writes, and the others wait for it before the test loads the
    checkpoint."""
    if calibrate:
        module.calibrate()
    module.choose_operating_points()
    entries: dict[str, Any] = {}
    if module.temperature is not None:
        entries.update(temperature=module.temperature.tolist(), threshold=float(module.threshold))
    if module.operating:
        entries["operating_thresholds"] = dict(module.operating)
    if trainer.is_global_zero and entries:
        update_checkpoint_meta(best, **entries)
        if best.name != "best.ckpt" and (best.parent / "best.ckpt").exists():
            update_checkpoint_meta(best.parent / "best.ckpt", **entries)
    trainer.strategy.barrier("decided on val")


def _finished(plan: Resume, run_dir: Path, *, command: str) -> bool:
    """Whether the resumed run is finished, its results written: then say so (and touch nothing).
    Trained to its end without results (stopped in its final evaluation), it is evaluated."""
    if not (plan.finished and (run_dir / "metrics.json").exists()):
        return False
    console.print(finished_message(plan, run_dir, command=command), markup=False, highlight=False, soft_wrap=True)
    return True


def _say_resume(plan: Resume, run_dir: Path, *, quiet: bool) -> None:
    if plan.changes:  # said even when quiet: the run goes on with a recipe other than it began with
        console.print(f"resuming the run in {run_dir} after epoch {plan.epochs_done}, with these changes to its "
                      f"recipe: {'; '.join(plan.changes)}", markup=False, highlight=False, soft_wrap=True)
    elif not quiet:
        console.print(f"resuming the run in {run_dir} after epoch {plan.epochs_done}", markup=False, highlight=False,
                      soft_wrap=True)


FIND_LR_STEPS = (24, 100)  # fewest steps that give a usable curve (the pick skips the first 10), most


def _find_lr(trainer: Any, built: Built, run_dir: Path) -> Recipe:
    from lightning.pytorch.tuner import Tuner

    from ..train.freezing import Freezing

    # the finder replaces the callbacks: freeze as the first epoch will, so it tunes what trains
    Freezing(built.recipe.finetune).apply(built.module, 0)
    built.datamodule.setup("fit")
    if getattr(built.module, "start_from_data", False):
        # an embedding head starts from the data when the fit starts, which the finder's own run
        # does not do: started here, the finder tunes the head that trains (and puts it back as it
        # was before its search, so the fit keeps this start)
        built.module.start_head(built.datamodule.unaugmented_loader("train"))
        built.module.start_from_data = False
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
    # a later --resume with the recipe as given (its own lr) means this pick
    built.module.effft_meta["lr_finder"] = {"given": float(built.recipe.optimizer.lr), "picked": float(pick)}
    return recipe
