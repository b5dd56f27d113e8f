"""From a recipe to what trains it, in one order, each fact decided once:

    source -> splits -> model with its weights -> InputSpec -> DataModule -> LightningModule -> Trainer

Nothing is patched after it is built. `build_inputs` stops after the InputSpec (what `effft
info` shows); `build` goes on to the DataModule and the LightningModule; `make_trainer` makes
the Trainer with effft's callbacks and loggers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from ..config.schema import Recipe
from ..config.trainer import BUDGET as TRAINER_BUDGET
from ..config.trainer import DEFAULTS as TRAINER_DEFAULTS
from ..console import console
from ..data.attributes import check_subgroups
from ..data.dataset import LoadedData, load_data
from ..data.transforms import takes_input_size
from ..errors import RecipeError, WeightsError
from ..input import InputSpec, resolve
from ..model.efficientnet import EfficientNet
from ..model.registry import create_model, default_weights
from .layout import CHECKPOINTS, input_spec

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """The data, the model with its weights, and the InputSpec of a run."""

    data: LoadedData
    model: EfficientNet
    spec: InputSpec
    weights: str  # where the weights came from, for people to read
    weights_input: InputSpec  # what the weights are fed with: 3 channels at their own size
    train_people: list[int] | None = None  # embedding runs: the classes (people) the loss trains on


@dataclass
class Built:
    recipe: Recipe
    data: LoadedData
    spec: InputSpec
    datamodule: Any
    module: Any
    weights: str


def recipe_weights(recipe: Recipe) -> str | None:
    """The weights the recipe asks for: a hub id or a file, the default weights of the model
    (`pretrained: true`), or None (random initialisation)."""
    pretrained = recipe.model.pretrained
    if pretrained is True:
        try:
            return default_weights(recipe.model.arch)
        except WeightsError as exc:
            raise RecipeError(f"model.pretrained: {exc}") from None
    return str(pretrained) if pretrained else None


def _model(recipe: Recipe, *, num_classes: int, weights: str | None, trained: bool,
           embedding_dim: int | None = None) -> tuple[EfficientNet, str]:
    kwargs = dict(num_classes=num_classes, in_chans=recipe.model.in_chans, embedding_dim=embedding_dim,
                  drop_rate=recipe.model.drop_rate, drop_path_rate=recipe.model.drop_path_rate)
    try:
        model = create_model(recipe.model.arch, pretrained=weights, **kwargs)
        return model, (model.weights_source or str(weights)) if weights else "random initialisation"
    except WeightsError as exc:
        if trained or not recipe.model.allow_random_init:  # a trained model never falls back
            raise
        console.print(f"[bold yellow]WEIGHTS UNAVAILABLE, TRAINING FROM RANDOM INITIALISATION:[/] {escape(str(exc))}")
        return create_model(recipe.model.arch, **kwargs), f"random initialisation ({weights} could not be had)"


@dataclass(frozen=True)
class Trained:
    """A trained run's checkpoint and its `effft` entry: rebuilding from it takes its weights,
    InputSpec and threshold, not the recipe's."""

    ckpt: Path
    meta: dict[str, Any]


def build_inputs(recipe: Recipe, *, splits_file: Path | None = None, weights: str | None = None,
                 trained: Trained | None = None, test_only: bool = False, progress: bool = True) -> Inputs:
    """The data (loaded and split), the model sized for it with `weights` (or the `trained`
    run's), and the InputSpec: the trained run's, else resolved from the weights and the
    recipe. With `test_only` every image of the data is test data."""
    spec = input_spec(trained.meta, trained.ckpt) if trained is not None else None
    if trained is not None:
        weights = str(trained.ckpt)
    # a trained run's data are put in the order it was trained with (runs from before the
    # positive class was chosen by name included)
    trained_classes = list(trained.meta.get("classes", [])) if trained is not None else []
    positive = trained_classes[1] if len(trained_classes) == 2 else recipe.metrics.positive_class
    data = load_data(recipe.data, channels=recipe.model.in_chans, seed=recipe.seed, splits_file=splits_file,
                     test_only=test_only, progress=progress, positive_class=positive,
                     positive_key="the trained run's positive class" if len(trained_classes) == 2
                     else "metrics.positive_class")
    check_subgroups(recipe.data, recipe.report.subgroups)  # before a run writes anything
    if recipe.model.num_classes is not None and recipe.model.num_classes != data.num_classes:
        raise RecipeError(f"model.num_classes is {recipe.model.num_classes} but the data at "
                          f"{recipe.data.root} has {data.num_classes} classes ({', '.join(data.classes)}): "
                          "remove model.num_classes or fix the data")
    num_classes, embedding_dim, people = data.num_classes, None, None
    if recipe.task == "embedding":
        num_classes, embedding_dim, people = embedding_head(recipe, data, trained)
    model, used = _model(recipe, num_classes=num_classes, weights=weights, trained=trained is not None,
                         embedding_dim=embedding_dim)
    if trained is not None:
        used = str(trained.meta.get("weights", used))
    # what the weights say they were trained with, or the recipe where it knows better
    weights_input = model.preprocessing if trained is not None else \
        resolve(model.preprocessing, image_size=None, channels=3, overrides=recipe.model.preprocessing.given())
    if spec is None:
        spec = resolve(weights_input, image_size=recipe.data.image_size, channels=recipe.model.in_chans)
    _check_augment_sizes(recipe, spec.size)
    from ..data.datamodule import check_disk_cache

    check_disk_cache(data, spec)
    return Inputs(data=data, model=model, spec=spec, weights=used, weights_input=weights_input, train_people=people)


def embedding_head(recipe: Recipe, data: LoadedData, trained: Trained | None) -> tuple[int, int | None, list[int]]:
    """An embedding run's (classes of the model's classifier, embedding length, training people):
    a margin head has no classifier; a softmax head classifies the training people. A trained
    run's people are those its checkpoint names (its data may be other data, all test)."""
    head = recipe.model.head
    assert head is not None  # the schema gives every embedding run one
    if trained is not None:
        try:
            people = [int(p) for p in trained.meta["embedding"]["train_people"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(f"the 'effft' entry of {trained.ckpt} lacks its embedding ({exc!r}): was the file "
                              "edited?") from None
    else:
        people = sorted({int(it.target) for it in data.split_items("train")})  # type: ignore[arg-type]
        if len(people) < 2:
            raise RecipeError(f"task: embedding needs at least two people in the train split, and it has "
                              f"{len(people)}: add people to {recipe.data.root}, or give data.split.train more")
    return (len(people), None, people) if head.type == "softmax" else (0, head.dim, people)


_SIZED = {"size", "height", "width"}  # arguments by which albumentations transforms set an output size


def _check_augment_sizes(recipe: Recipe, image_size: int) -> None:
    """A custom pipeline must end at the input size, or batches would not be what the model and
    the other split get (a list written for one size, then --set data.image_size=...)."""
    for split in ("train", "eval"):
        entries = getattr(recipe.data.augment, split)
        if entries is None:  # "default": made for the input size
            continue
        for i in reversed(range(len(entries))):
            (name, args), = entries[i].items()
            args = args or {}
            if not _SIZED & set(args):
                if takes_input_size(name):
                    break  # written without a size: it makes the input size
                continue
            size = args.get("size", (args.get("height"), args.get("width")))
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            if size != (image_size, image_size):
                raise RecipeError(
                    f"data.augment.{split}[{i}].{name} makes {size[0]}x{size[1]} images but the input size is "
                    f"{image_size} (data.image_size or the weights'): make them agree")
            break
        else:  # nothing sets the size: images of several sizes cannot make one batch
            raise RecipeError(
                f"data.augment.{split}: no transform sets the size of the images, so images of different sizes could "
                f"not be batched: add one that makes {image_size}x{image_size} images, e.g. "
                + (f"RandomResizedCrop: {{size: [{image_size}, {image_size}]}}" if split == "train"
                   else f"Resize: {{height: {image_size}, width: {image_size}}}") + ', or write "default"')


def check_fit_plan(recipe: Recipe, data: LoadedData, *, image_size: int) -> None:
    """What `trainer:`, the batch size and this data make of a fit, checked before anything is
    written: every epoch trains on at least one batch, validation runs (it chooses the best
    checkpoint), BatchNorm never trains on a batch of one 1x1 feature map, and the learning-rate
    schedule knows the length of the run. Counted for one process; under DDP each has fewer
    batches, which Lightning checks when training starts."""
    monitor(recipe, data.task, data.classes)  # a validation metric of this task
    if recipe.task == "embedding":
        _check_people(data)
    args = {**TRAINER_DEFAULTS, **recipe.trainer}
    counts = {split: len(data.split_items(split)) for split in ("train", "val", "test")}
    train_batches = _check_batches(recipe, args, counts, image_size=image_size)
    _check_validation(recipe, args, counts, train_batches)
    _check_schedule(recipe, args)


def check_processes(trainer: Any, data: LoadedData, splits: tuple[str, ...] = ("val", "test")) -> None:
    """Under DDP every process evaluates its own share of a split, each image once: a split with
    fewer images than processes would leave one with none, which Lightning's sampler refuses with
    a bare assertion once training has started. Checked when the Trainer is made, before the run
    directory is written."""
    world = trainer.world_size
    for split in splits:
        n = len(data.split_items(split))
        if 0 < n < world:
            raise RecipeError(f"the {split} split has {n} image(s) but the run has {world} processes "
                              f"(trainer.devices x trainer.num_nodes), and each process evaluates a share of it: "
                              f"give the {split} split {world} images or more (data.split.{split}, or the data set's own "
                              f"{split} folder), or run on {n} device(s) or fewer")


def check_one_process(trainer: Any, what: str, instead: str) -> None:
    """Refuses work that runs in one process (`what`: the --find-lr finder, a tune trial) where the
    Trainer would start several: Lightning starts the others as copies of the command, which would
    not do the same work, and the processes would wait for each other for ever."""
    if trainer.world_size > 1:
        raise RecipeError(f"{what} runs in one process, but the recipe's Trainer runs {trainer.world_size} processes "
                          f"(trainer.devices x trainer.num_nodes, where devices: auto takes every GPU): {instead}")


def _check_people(data: LoadedData) -> None:
    """An embedding run's val and test splits can be judged: two people or more, and a person
    with two photos (a genuine pair)."""
    from collections import Counter

    for split in ("val", "test"):
        photos = Counter(int(it.target) for it in data.split_items(split))  # type: ignore[arg-type]
        if split == "test" and not photos:
            continue
        if len(photos) < 2 or max(photos.values()) < 2:
            raise RecipeError(f"the {split} split has {len(photos)} people and at most {max(photos.values(), default=0)} "
                              f"photo(s) of one: verification needs two people or more, one with two photos at least; "
                              f"give data.split.{split} more people (it is a fraction of the people)")


def _check_batches(recipe: Recipe, args: dict[str, Any], counts: dict[str, int], *, image_size: int) -> int:
    """Training batches of an epoch, after trainer.limit_train_batches."""
    import math

    from ..data.samplers import batch_count

    size = recipe.data.batch_size
    if image_size <= 32 and (size == 1 or counts["train"] == 1):
        what = "data.batch_size is 1" if size == 1 else "the train split has one image"
        raise RecipeError(f"{what}: at {image_size} px EfficientNet's last feature map is 1x1, and BatchNorm cannot "
                          "train on one value per channel: use data.batch_size of 2 or more (with 2 or more training "
                          "images) or data.image_size of 33 or more")
    used = {"train": batch_count(counts["train"], size)}
    for split in ("train", "val", "test"):
        n, limit = used.get(split, math.ceil(counts[split] / size)), args.get(f"limit_{split}_batches")
        if split == "val" and limit == 0:
            raise RecipeError(f"trainer.limit_val_batches: {limit} skips validation, which chooses the best checkpoint "
                              "(and a binary threshold): remove it, or validate less often with "
                              "trainer.check_val_every_n_epoch")
        if limit is None or n == 0:
            continue
        used[split] = int(n * limit) if isinstance(limit, float) else min(n, limit)  # as Lightning counts
        if used[split] == 0:
            raise RecipeError(f"trainer.limit_{split}_batches: {limit} of the {n} {split} batch(es) is less than one "
                              f"batch ({counts[split]} images, data.batch_size {size}): give a larger fraction, or a "
                              "whole number of batches such as 1")
    return used["train"]


def _check_validation(recipe: Recipe, args: dict[str, Any], counts: dict[str, int], train_batches: int) -> None:
    if counts["val"] == 0:
        raise RecipeError("the val split is empty, and validation chooses the best checkpoint: give it images "
                          "(data.split.val, or a val folder where the data set has its own splits)")
    interval, every, epochs = args.get("val_check_interval"), args.get("check_val_every_n_epoch", 1), args.get("max_epochs")
    if isinstance(interval, int) and every is not None and interval > train_batches:
        raise RecipeError(
            f"trainer.val_check_interval: {interval} batches is more than the {train_batches} training batches of an "
            f"epoch ({counts['train']} images, data.batch_size {recipe.data.batch_size}): make it at most "
            f"{train_batches}, give a fraction of the epoch such as 0.5, or set trainer.check_val_every_n_epoch: null "
            "to count batches across epochs")
    if isinstance(interval, int) and every is None and isinstance(epochs, int) and epochs >= 1 \
            and interval > train_batches * epochs:
        raise RecipeError(f"trainer.val_check_interval: {interval} batches is more than the {train_batches * epochs} "
                          f"training batches of all {epochs} epochs, so no validation would run and no checkpoint "
                          "would be chosen: make it smaller")


def _check_schedule(recipe: Recipe, args: dict[str, Any]) -> None:
    """The learning-rate schedule and the fine-tuning schedule, against the length of the run."""
    epochs, schedule, finetune = args.get("max_epochs"), recipe.scheduler, recipe.finetune
    endless = args.get("max_steps", -1) == -1 and (epochs == -1 or (epochs is None and args.get("max_time") is not None))
    if endless and schedule.name in ("cosine", "onecycle"):
        raise RecipeError(f"scheduler.name: {schedule.name} plans the learning rate over the whole run, which has no "
                          "set length (trainer.max_epochs: -1, or null with max_time): give trainer.max_epochs or "
                          "trainer.max_steps, or use scheduler.name: step or none")
    if not isinstance(epochs, int) or epochs < 1:
        return
    if schedule.name == "cosine" and epochs <= schedule.warmup_epochs:
        log.warning("scheduler.warmup_epochs: %g is as long as the run (trainer.max_epochs: %d): the learning rate "
                    "never reaches optimizer.lr", schedule.warmup_epochs, epochs)
    later = {"freeze_then_unfreeze": [finetune.unfreeze_epoch], "gradual": finetune.milestones}.get(finetune.strategy, [])
    if any(e >= epochs for e in later):
        log.warning("finetune: %s unfreezes at epoch(s) %s (counted from 0), but the run has %d epoch(s) "
                    "(trainer.max_epochs): what would unfreeze then stays frozen", finetune.strategy,
                    [e for e in later if e >= epochs], epochs)


def build(recipe: Recipe, *, splits_file: Path | None = None, weights: str | None = None,
          trained: Trained | None = None, test_only: bool = False, progress: bool = True) -> Built:
    """Everything `effft fit` and `effft test` need before the Trainer (see `build_inputs`)."""
    from ..data.datamodule import EffftDataModule
    from ..train.module import EffftModule

    inputs = build_inputs(recipe, splits_file=splits_file, weights=weights, trained=trained, test_only=test_only,
                          progress=progress)
    data, model = inputs.data, inputs.model
    if recipe.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dm = EffftDataModule(data, inputs.spec, seed=recipe.seed, progress=progress)
    class_weights = data.class_weights() if recipe.loss.class_weights and data.task != "multilabel" else None
    pos_weight = data.pos_weight() if recipe.loss.pos_weight and data.task == "multilabel" else None
    threshold = float(trained.meta.get("threshold", 0.5)) if trained is not None else None
    temperature = trained.meta.get("temperature") if trained is not None else None
    operating = trained.meta.get("operating_thresholds") if trained is not None else None
    meta = {"weights": inputs.weights, "preprocessing": inputs.weights_input.to_dict()}
    if recipe.task == "embedding":
        from ..train.embedding import EmbeddingModule

        module = EmbeddingModule(model, recipe=recipe, spec=inputs.spec, classes=data.classes,
                                 train_people=inputs.train_people or [], threshold=threshold, operating=operating,
                                 effft_meta=meta)
        return Built(recipe=recipe, data=data, spec=inputs.spec, datamodule=dm, module=module, weights=inputs.weights)
    module = EffftModule(model, recipe=recipe, spec=inputs.spec, task=data.task, classes=data.classes,
                         class_weights=class_weights, pos_weight=pos_weight, threshold=threshold,
                         temperature=None if temperature is None else torch.tensor(temperature, dtype=torch.float32),
                         operating=operating, effft_meta=meta)
    return Built(recipe=recipe, data=data, spec=inputs.spec, datamodule=dm, module=module, weights=inputs.weights)


# ---------------------------------------------------------------------------- the Trainer


def monitor(recipe: Recipe, task: str, classes: list[str]) -> tuple[str, str]:
    """The validation metric that picks the best checkpoint (and stops early), and its direction."""
    from ..evaluate.metrics import metric_names

    metric = recipe.monitor.metric
    task = "embedding" if recipe.task == "embedding" else task
    names = ["loss"] + metric_names(task=task, classes=classes)
    if not metric.startswith("val/") or metric[4:] not in names:
        raise RecipeError(f"monitor.metric: {metric!r} is not a validation metric of this {task} task; "
                          f"choose one of {', '.join('val/' + n for n in names if '/' not in n)}")
    return metric, monitor_direction(recipe)


def monitor_direction(recipe: Recipe) -> str:
    """Whether the recipe's monitored metric is better lower ("min") or higher ("max")."""
    from ..evaluate.metrics import metric_direction

    mode = recipe.monitor.mode
    return metric_direction(recipe.monitor.metric) if mode == "auto" else mode


def make_trainer(recipe: Recipe, run_dir: Path, *, task: str, classes: list[str], quiet: bool,
                 fit: bool = True) -> Any:
    """The Trainer as the recipe says, with effft's callbacks: for `fit`, the best and last
    checkpoints, the fine-tuning schedule, EMA where asked for, loggers; a progress bar unless
    `quiet`."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    from ..console import adopt_lightning_logging
    from ..train.divergence import Divergence
    from ..train.freezing import Freezing
    from .jobs import Interruption
    from .writing import WholeCheckpoints

    adopt_lightning_logging()
    callbacks: list[Any] = [Interruption()]  # which signal stopped a run (see runs/jobs.py)
    loggers: list[Any] | bool = False
    if fit:
        metric, mode = monitor(recipe, task, classes)
        best = ModelCheckpoint(dirpath=run_dir / CHECKPOINTS, filename="best", monitor=metric, mode=mode,
                               save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False)
        # Lightning's own save_last writes last.ckpt only in epochs where `best` improves; --resume
        # needs the end of every epoch, so a second callback without a monitor keeps the latest.
        last = ModelCheckpoint(dirpath=run_dir / CHECKPOINTS, filename="last", monitor=None, save_top_k=1,
                               enable_version_counter=False, auto_insert_metric_name=False)
        loggers = make_loggers(recipe, run_dir) or False
        callbacks += [best, last, Freezing(recipe.finetune), Divergence()]
        if loggers:  # Lightning's monitor needs a logger to write to
            callbacks += [LearningRateMonitor(logging_interval="epoch"), _log_recipe(recipe)]
        if recipe.ema.enabled:
            from ..train.averaging import ExponentialAverage

            callbacks.append(ExponentialAverage(decay=recipe.ema.decay))
        if recipe.monitor.early_stopping_patience:
            callbacks.append(EarlyStopping(monitor=metric, mode=mode, patience=recipe.monitor.early_stopping_patience))
    if not quiet:
        callbacks.append(_progress_bar())
    args = {**TRAINER_DEFAULTS, **recipe.trainer}
    args.pop(TRAINER_BUDGET, None)  # effft's own: planned into max_epochs by runs/budget.py
    try:
        return L.Trainer(**args, default_root_dir=run_dir, callbacks=callbacks, logger=loggers,
                         plugins=[WholeCheckpoints()], enable_checkpointing=fit, use_distributed_sampler=False, enable_progress_bar=not quiet,
                         sync_batchnorm=recipe.model.sync_batchnorm, enable_model_summary=not quiet)
    except (MisconfigurationException, TypeError, ValueError, ImportError) as exc:
        # Lightning checks the values of its arguments (an accelerator this machine lacks, or the
        # package it needs: torch_xla for tpu, deepspeed ...)
        given = ", ".join(f"{k}: {v!r}" for k, v in recipe.trainer.items())
        raise RecipeError(f"trainer: Lightning refuses these arguments ({given}): {exc}") from None


def _progress_bar() -> Any:
    from lightning.pytorch.callbacks import RichProgressBar

    class ProgressBar(RichProgressBar):
        def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)  # the logger's version says nothing to a user
            return metrics

    return ProgressBar()


# ---------------------------------------------------------------------------- the loggers


def make_loggers(recipe: Recipe, run_dir: Path) -> list[Any]:
    """Lightning's own logger for each name in `recipe.loggers`, each writing under `run_dir/logs`
    (MLflow and W&B: unless their environment names a server or project of the user's)."""
    from ..config.load import check_loggers

    check_loggers(recipe, source="recipe")
    return [_LOGGERS[name](recipe, run_dir) for name in recipe.loggers]


def _csv(recipe: Recipe, run_dir: Path) -> Any:
    from .writing import HistoryCSVLogger  # Lightning's, appending to metrics.csv when a run is resumed

    return HistoryCSVLogger(save_dir=run_dir, name="logs", version="csv")


def _tensorboard(recipe: Recipe, run_dir: Path) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=run_dir, name="logs", version="tensorboard", default_hp_metric=False)


def _mlflow(recipe: Recipe, run_dir: Path) -> Any:
    """MLflow's tracking store is MLFLOW_TRACKING_URI where set (a server of the user's), else a
    SQLite file in the run directory: MLflow's default store since 3.7 (the ./mlruns file store is
    kept only for old data), and one that needs no server and no network."""
    from lightning.pytorch.loggers import MLFlowLogger

    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "effft"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        uri, artifacts = os.environ["MLFLOW_TRACKING_URI"], None
    else:
        uri, artifacts = mlflow_store_uri(run_dir), (run_dir / "logs" / "mlflow" / "artifacts").resolve().as_uri()

    def make() -> Any:
        if artifacts is not None:  # the run's own store, new: made here without MLflow's and Lightning's notes
            from mlflow.tracking import MlflowClient

            # MLflow says at INFO that it makes the tables of a new SQLite store: every run has one
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
            client = MlflowClient(uri)
            if client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment, artifact_location=artifacts)
        return MLFlowLogger(experiment_name=experiment, run_name=recipe.name, tracking_uri=uri,
                            artifact_location=artifacts)

    # MLFlowLogger makes its MLflow client at once, and a client of a SQLite store creates the
    # file: the logger is made on first use, after the run directory is checked and made, and on
    # the first DDP process only.
    return _on_first_use(make, save_dir=None)


def _on_first_use(make: Callable[[], Any], *, save_dir: str | None) -> Any:
    """A Lightning logger that stands for `make()`, made when the first process first logs."""
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.loggers.logger import rank_zero_experiment
    from lightning.pytorch.utilities import rank_zero_only

    class OnFirstUse(Logger):
        def __init__(self) -> None:
            super().__init__()
            self._logger: Any = None

        @property
        def made(self) -> Any:
            if self._logger is None:
                self._logger = make()
            return self._logger

        @property
        @rank_zero_experiment
        def experiment(self) -> Any:
            return self.made.experiment

        @property
        def name(self) -> Any:
            return self.made.name if rank_zero_only.rank == 0 else None

        @property
        def version(self) -> Any:
            return self.made.version if rank_zero_only.rank == 0 else None

        @property
        def save_dir(self) -> str | None:
            return save_dir

        @rank_zero_only
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            self.made.log_hyperparams(params, *args, **kwargs)

        @rank_zero_only
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.made.log_metrics(metrics, step)

        @rank_zero_only
        def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
            self.made.after_save_checkpoint(checkpoint_callback)

        @rank_zero_only
        def finalize(self, status: str) -> None:
            if self._logger is not None:  # nothing logged, nothing to close
                self._logger.finalize(status)

    return OnFirstUse()


def mlflow_store_uri(run_dir: Path) -> str:
    """The tracking URI of a run's own MLflow store (for MLflow's client and `mlflow ui --backend-store-uri`)."""
    return f"sqlite:///{(run_dir / 'logs' / 'mlflow' / 'mlflow.db').resolve()}"


def _wandb(recipe: Recipe, run_dir: Path) -> Any:
    """W&B as its environment says (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY ...); its files go to
    `run_dir/logs/wandb`. Online without credentials it would stop at the first epoch, after the run
    directory is written: that is said now."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode not in {"offline", "disabled", "dryrun"}:
        try:
            logged_in = wandb.login(prompt=False, verify=False)  # wandb >= 0.30
        except TypeError:  # before 0.30: the key as wandb finds it (WANDB_API_KEY, ~/.netrc)
            logged_in = bool(wandb.api.api_key)
        if not logged_in:
            raise RecipeError("loggers: wandb has no API key here: run `wandb login` (or set WANDB_API_KEY), "
                              "or set WANDB_MODE=offline to keep the W&B run in the run directory and "
                              "`wandb sync` it later")

    def make() -> Any:
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)  # W&B looks for a git repository there, and warns where none is
        logger = WandbLogger(project=os.environ.get("WANDB_PROJECT") or "effft", name=recipe.name, save_dir=str(logs))
        # Lightning passes `anonymous=None`, which current wandb warns about on every run although
        # it means "not set"; leaving the key out means the same.
        if logger._wandb_init.get("anonymous", False) is None:
            del logger._wandb_init["anonymous"]
        return logger

    # made on first use, as MLflow's: the directory it needs is made after the run directory is checked
    return _on_first_use(make, save_dir=str(run_dir / "logs"))


_LOGGERS: dict[str, Callable[[Recipe, Path], Any]] = {
    "csv": _csv, "tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb,
}


def _log_recipe(recipe: Recipe) -> Any:
    """A callback that gives the loggers the resolved recipe as the run's hyperparameters (the
    module keeps no `hparams`: the recipe travels in the checkpoint's effft entry)."""
    from lightning.pytorch.callbacks import Callback

    class LogRecipe(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            for logger in trainer.loggers:
                logger.log_hyperparams(recipe.to_dict())

    return LogRecipe()
