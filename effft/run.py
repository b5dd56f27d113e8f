"""What the commands do: build (model, data, module, trainer) from a recipe; fit and test.

Nothing is written until the recipe, the data and the weights have been checked, so a mistake
leaves no half-made run directory behind.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.markup import escape

from .console import console
from .errors import EffftError, RecipeError, WeightsError
from .recipe import Recipe, apply_overrides, check_paths, validate

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


@dataclass
class Built:
    recipe: Recipe
    datamodule: Any
    module: Any
    weights: str


def build_model_and_data(recipe: Recipe, *, splits_file: Path | None = None, pretrained: Any = "recipe",
                         progress: bool = True) -> tuple[Any, Any, str]:
    """The data module (source loaded, split) and the model sized for it, with its weights."""
    from .data.datamodule import EffftDataModule
    from .model.efficientnet import create_model, get_variant
    from .model.tags import Preprocessing

    variant = get_variant(recipe.model.arch)
    dm = EffftDataModule(recipe.data, preprocessing=Preprocessing(input_size=variant.resolution),
                         in_chans=recipe.model.in_chans, seed=recipe.seed, splits_file=splits_file,
                         progress=progress)
    dm.prepare_source()
    if recipe.model.num_classes is not None and recipe.model.num_classes != dm.num_classes:
        raise RecipeError(f"model.num_classes is {recipe.model.num_classes} but the data at "
                          f"{recipe.data.root} has {dm.num_classes} classes ({', '.join(dm.classes)}): "
                          "remove model.num_classes or fix the data")
    weights = recipe.model.pretrained if pretrained == "recipe" else pretrained
    if weights is True:
        from .model.tags import default_tag

        tag = default_tag(recipe.model.arch)
        if tag is None:
            raise RecipeError(f"model.pretrained: no published weights are known for {recipe.model.arch}; "
                              "give a weight file or hub id, or pretrained: false")
        weights = f"timm/{recipe.model.arch}.{tag}"
    kwargs = dict(num_classes=dm.num_classes, in_chans=recipe.model.in_chans,
                  drop_rate=recipe.model.drop_rate, drop_path_rate=recipe.model.drop_path_rate)
    try:
        model = create_model(recipe.model.arch, pretrained=weights or None, **kwargs)
        used = model.weights_source or str(weights) if weights else "random initialisation"
    except WeightsError as exc:
        if not recipe.model.allow_random_init:
            raise
        console.print(f"[bold yellow]WEIGHTS UNAVAILABLE, TRAINING FROM RANDOM INITIALISATION:[/] {escape(str(exc))}")
        model = create_model(recipe.model.arch, **kwargs)
        used = f"random initialisation ({weights} could not be had)"
    given = recipe.model.preprocessing.given()
    if given:  # the recipe knows better than a weight file that says nothing
        model.preprocessing = dataclasses.replace(model.preprocessing, **given)
    dm.preprocessing = model.preprocessing.for_channels(recipe.model.in_chans)
    dm.image_size = recipe.data.image_size or model.preprocessing.input_size
    _check_augment_sizes(recipe, dm.image_size)
    return dm, model, used


_SIZED = {"size", "height", "width"}  # arguments by which albumentations transforms set an output size


def _check_augment_sizes(recipe: Recipe, image_size: int) -> None:
    """A custom pipeline must end at the input size, or batches would not be what the model and
    the other split get (a list written for one size, then --set data.image_size=...)."""
    for split in ("train", "eval"):
        entries = getattr(recipe.data.augment, split) or []
        for i in reversed(range(len(entries))):
            (name, args), = entries[i].items()
            args = args or {}
            if not _SIZED & set(args):
                continue
            size = args.get("size", (args.get("height"), args.get("width")))
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            if size != (image_size, image_size):
                raise RecipeError(
                    f"data.augment.{split}[{i}].{name} makes {size[0]}x{size[1]} images but the input size is "
                    f"{image_size} (data.image_size or the weights'): make them agree")
            break


def build(recipe: Recipe, *, splits_file: Path | None = None, pretrained: Any = "recipe",
          progress: bool = True) -> Built:
    from .train.module import EffftModule

    dm, model, used = build_model_and_data(recipe, splits_file=splits_file, pretrained=pretrained, progress=progress)
    if recipe.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    class_weights = dm.class_weights() if recipe.loss.class_weights and dm.task != "multilabel" else None
    pos_weight = dm.pos_weight() if recipe.loss.pos_weight and dm.task == "multilabel" else None
    module = EffftModule(model, recipe=recipe, task=dm.task, classes=dm.classes, class_weights=class_weights,
                         pos_weight=pos_weight, effft_meta={"weights": used})
    return Built(recipe=recipe, datamodule=dm, module=module, weights=used)


def _monitor(recipe: Recipe, task: str, classes: list[str]) -> tuple[str, str]:
    from .train.metrics import metric_direction, metric_names

    metric = recipe.monitor.metric
    names = ["loss"] + metric_names(task=task, classes=classes)
    if not metric.startswith("val/") or metric[4:] not in names:
        raise RecipeError(f"monitor.metric: {metric!r} is not a validation metric of this {task} task; "
                          f"choose one of {', '.join('val/' + n for n in names if '/' not in n)}")
    mode = recipe.monitor.mode
    return metric, metric_direction(metric) if mode == "auto" else mode


def make_trainer(recipe: Recipe, run_dir: Path, *, task: str, classes: list[str], quiet: bool, fit: bool = True) -> Any:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from .console import adopt_lightning_logging
    from .train.finetune import FinetuneSchedule

    adopt_lightning_logging()
    callbacks: list[Any] = []
    loggers: list[Any] | bool = False
    if fit:
        metric, mode = _monitor(recipe, task, classes)
        best = ModelCheckpoint(dirpath=run_dir / CHECKPOINTS, filename="best", monitor=metric, mode=mode,
                               save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False)
        # Lightning's own save_last writes last.ckpt only in epochs where `best` improves; --resume
        # needs the end of every epoch, so a second callback without a monitor keeps the latest.
        last = ModelCheckpoint(dirpath=run_dir / CHECKPOINTS, filename="last", monitor=None, save_top_k=1,
                               enable_version_counter=False, auto_insert_metric_name=False)
        callbacks += [best, last, FinetuneSchedule(recipe.finetune), LearningRateMonitor(logging_interval="epoch")]
        if recipe.monitor.early_stopping_patience:
            callbacks.append(EarlyStopping(monitor=metric, mode=mode, patience=recipe.monitor.early_stopping_patience))
        loggers = [CSVLogger(save_dir=run_dir, name="logs", version="csv"),
                   TensorBoardLogger(save_dir=run_dir, name="logs", version="tensorboard", default_hp_metric=False)]
    if not quiet:
        callbacks.append(_ProgressBar())
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    args = {"max_epochs": 10, "num_sanity_val_steps": 0, **recipe.trainer}
    try:
        trainer = L.Trainer(**args, default_root_dir=run_dir, callbacks=callbacks, logger=loggers,
                            enable_checkpointing=fit, use_distributed_sampler=False, enable_progress_bar=not quiet,
                            sync_batchnorm=recipe.model.sync_batchnorm, enable_model_summary=not quiet)
        _trainers.append(trainer)
        return trainer
    except (MisconfigurationException, TypeError, ValueError) as exc:
        # Lightning checks the values of its arguments (a wrong type, an unknown accelerator ...)
        given = ", ".join(f"{k}: {v!r}" for k, v in recipe.trainer.items())
        raise RecipeError(f"trainer: Lightning refuses these arguments ({given}): {exc}") from None


def _progress_bar_class() -> type:
    from lightning.pytorch.callbacks import RichProgressBar

    class ProgressBar(RichProgressBar):
        def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)  # the logger's version says nothing to a user
            return metrics

    return ProgressBar


def _ProgressBar() -> Any:  # noqa: N802 - reads as the class it builds
    return _progress_bar_class()()


# ---------------------------------------------------------------------------- run directory


_trainers: list[Any] = []  # the trainers of this process, so a failed job can stop what they launched


def stop_launched_processes() -> None:
    """Kill the processes Lightning's launcher started from this one (the other DDP ranks)."""
    import signal

    for trainer in _trainers:
        launcher = trainer.strategy.launcher
        if launcher is not None and getattr(launcher, "procs", None):
            launcher.kill(signal.SIGKILL)


def launched_first() -> bool:
    """Whether this is the first process of the job: the only one under a plain run; under
    torchrun, SLURM or Lightning's own launcher, the one with rank 0 on node 0."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        if int(os.environ.get(key, "0") or 0) > 0:
            return False
    return True


def _prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Check the run directory may be used; returns last.ckpt when resuming."""
    from .paths import can_make_folder

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


def _jsonable(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def write_results(run_dir: Path, built: Built, results: dict[str, dict[str, float]], *, report_split: str = "test") -> None:
    """metrics.json, report/ and summary.md (rank 0 only)."""
    from .train.report import write_report, write_summary

    module, dm = built.module, built.datamodule
    (run_dir / "metrics.json").write_text(json.dumps({s: _jsonable(m) for s, m in results.items()}, indent=2))
    split = report_split if report_split in module.predictions else "val"
    preds = module.predictions.get(split)
    threshold = float(module.threshold) if module.task == "binary" else None
    if preds is not None and len(preds["targets"]):
        items = dm.split_items(split)
        paths = [items[i].path for i in preds["index"].tolist()] if len(preds["index"]) == len(preds["targets"]) else None
        write_report(run_dir / "report", task=module.task, classes=module.classes, probs=preds["probs"],
                     targets=preds["targets"], threshold=threshold, paths=paths, title=f"{built.recipe.name} ({split})")
    write_summary(run_dir, recipe_name=built.recipe.name, model_name=built.recipe.model.arch, weights=built.weights,
                  metrics_by_split=results, threshold=threshold,
                  files={"checkpoints": CHECKPOINTS, "report": "report", "logs": "logs"})


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
    built = build(recipe, splits_file=splits_file, progress=not quiet)
    dm, module = built.datamodule, built.module
    trainer = make_trainer(recipe, run_dir, task=dm.task, classes=dm.classes, quiet=quiet)
    # Everything checked: from here on the run directory is written.
    if first:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dm.write_run_files(run_dir)
        if find_lr:
            recipe = _find_lr(trainer, built, run_dir)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    if recipe.model.compile:
        module.model = torch.compile(module.model)
    with warnings.catch_warnings():
        # the fine-tuning schedule keeps frozen stages (and their BatchNorm statistics) in eval
        # mode on purpose; Lightning's note that it found modules in eval mode is not news
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # small data sets: the epoch's mean loss is logged whatever the step logging interval
        warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
        trainer.fit(module, datamodule=dm, ckpt_path=last, weights_only=True)
    best = trainer.checkpoint_callback.best_model_path or str(run_dir / CHECKPOINTS / "last.ckpt")
    if best and Path(best).exists():
        shutil.copyfile(best, run_dir / CHECKPOINTS / "best.ckpt") if Path(best).name != "best.ckpt" else None
    results: dict[str, dict[str, float]] = {}
    trainer.validate(module, datamodule=dm, ckpt_path=best, weights_only=True, verbose=False)
    results["val"] = module.results.get("val", {})
    if dm.split_items("test"):
        trainer.test(module, datamodule=dm, ckpt_path=best, weights_only=True, verbose=False)
        results["test"] = module.results.get("test", {})
    if trainer.is_global_zero:
        write_results(run_dir, built, results)
        _write_error_grid(run_dir, run_dir, built)
        show_results(results, run_dir, built.weights)
    return run_dir


def _write_error_grid(out: Path, model: Path, built: Built) -> None:
    """out/report/errors.png: Grad-CAM overlays of the most confident wrong test predictions of
    `model` (a run directory or checkpoint), as many as `report.error_grid` says, for images read
    from files (not from arrays inside one file, as MedMNIST's)."""
    from .explain import error_grid
    from .predict import load_run

    predictions, grid = out / "report" / "predictions.csv", out / "report" / "errors.png"
    grid.unlink(missing_ok=True)  # an earlier evaluation's grid is not this one's
    items = built.datamodule.split_items("test")
    k = built.recipe.report.error_grid
    if not k or not predictions.exists() or not items or any("::" in it.path for it in items[:1]):
        return
    try:  # images are read as this recipe's data section says (test may override it)
        run = load_run(model, data=built.recipe.to_dict()["data"])
        error_grid(run, predictions, grid, k=k)
    except EffftError as exc:  # the run itself is complete; the grid is an extra
        log.warning("no error grid in the report: %s", exc)


FIND_LR_STEPS = (24, 100)  # fewest steps that give a usable curve (the pick skips the first 10), most


def _find_lr(trainer: Any, built: Built, run_dir: Path) -> Recipe:
    from lightning.pytorch.tuner import Tuner

    from .train.finetune import FinetuneSchedule

    # the finder replaces the callbacks: freeze as the first epoch will, so it tunes what trains
    FinetuneSchedule(built.recipe.finetune)._apply(built.module, 0)
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
    fig.savefig(run_dir / "lr_find.png")
    console.print(f"learning-rate finder: picked optimizer.lr = {pick:.3g} (plot: {run_dir / 'lr_find.png'})", markup=False)
    recipe = built.recipe.model_copy(update={"optimizer": built.recipe.optimizer.model_copy(update={"lr": pick})})
    built.module.recipe = recipe
    return recipe


def show_results(results: dict[str, dict[str, float]], run_dir: Path, weights: str) -> None:
    from rich.table import Table

    split = "test" if results.get("test") else "val"
    table = Table(title=f"{split} metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in results[split].items():
        if "/" not in name:
            table.add_row(name, "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}")
    console.print(table)
    console.print(f"weights: {weights}", markup=False)
    console.print(f"run directory: {run_dir}", markup=False)


# ---------------------------------------------------------------------------- test


def load_checkpoint_meta(target: Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint path, its effft metadata) from a run directory or a checkpoint file."""
    ckpt = target / CHECKPOINTS / "best.ckpt" if target.is_dir() else target
    if not ckpt.exists():
        raise EffftError(f"no checkpoint at {ckpt}: give a run directory made by `effft fit` or a .ckpt file")
    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        # torch's own text for a file it cannot unpickle safely suggests loading it unsafely: never
        reason = "it is not a checkpoint, or it is damaged" if "Weights only load failed" in str(exc) or \
            isinstance(exc, pickle.UnpicklingError) else str(exc)
        raise EffftError(f"cannot read checkpoint {ckpt}: {reason}; give a run directory made by `effft fit` "
                         "or its checkpoints/best.ckpt") from None
    meta = data.get("effft") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or "recipe" not in meta:
        raise EffftError(f"{ckpt} was not written by effft fit (no recipe inside)")
    return ckpt, meta


def test(target: Path, *, overrides: list[str] | None = None, quiet: bool = False) -> dict[str, float]:
    """Re-evaluate a finished run (its test split, or with --set data.* other data)."""
    from .model.weights import load_weights

    ckpt, meta = load_checkpoint_meta(target)
    raw = apply_overrides(copy.deepcopy(meta["recipe"]), list(overrides or []))
    recipe = validate(raw, source=f"recipe in {ckpt}")
    check_paths(recipe, source=f"recipe in {ckpt}")
    run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent
    same_data = raw["data"] == meta["recipe"]["data"]
    splits_file = run_dir / "splits.csv" if same_data and (run_dir / "splits.csv").exists() else None
    built = build(recipe, splits_file=splits_file, pretrained=None, progress=not quiet)
    if built.datamodule.classes != meta["classes"]:
        raise EffftError(f"the data at {recipe.data.root} has classes {built.datamodule.classes}, "
                         f"but the model was trained on {meta['classes']}")
    load_weights(built.module.model, ckpt)
    built.module.threshold.fill_(float(meta.get("threshold", 0.5)))
    built.weights = meta.get("weights", str(ckpt))
    dm = built.datamodule
    if not same_data:  # other data: every item of it is the test set
        dm.items = [dataclasses.replace(it, split="test") for it in dm.items]
    if not dm.split_items("test"):
        raise EffftError(f"the data at {recipe.data.root} has no test split to evaluate")
    trainer = make_trainer(recipe, run_dir, task=dm.task, classes=dm.classes, quiet=quiet, fit=False)
    trainer.test(built.module, datamodule=dm, verbose=False)
    results = {"test": built.module.results["test"]}
    if trainer.is_global_zero:
        out = run_dir / "tests" / ("same_data" if same_data else "other_data")
        out.mkdir(parents=True, exist_ok=True)
        write_results(out, built, results)
        _write_error_grid(out, ckpt, built)
        show_results(results, out, built.weights)
    return results["test"]
