"""`effft bench fit`: a training epoch of `effft fit` against a plain Lightning loop around timm's model."""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.table import Table

from ..console import console
from ..errors import EffftError
from .model import reference_model


def _reference_epoch_seconds(root: Path, *, arch: str, image_size: int, batch_size: int, workers: int,
                             lr: float, seed: int) -> float:
    """One training epoch of a plain Lightning loop around timm's model: torchvision's
    ImageFolder and transforms, AdamW, cross-entropy; what a user would write by hand."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    timm_model = reference_model(arch)
    timm_model.reset_classifier(len([d for d in root.iterdir() if d.is_dir()]))

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm_model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=lr)

    tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.25, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = DataLoader(datasets.ImageFolder(str(root), tf), batch_size=batch_size, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0)
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    with _notes_off():
        trainer.fit(Plain(), loader)
    return time.perf_counter() - start


@contextmanager
def _notes_off() -> Iterator[None]:
    """fit's silenced Lightning notes, and the checkpoint's note that it saw no val figure: the
    timed epochs end before any validation, on purpose."""
    from ..runs.fit import lightning_notes_off

    with lightning_notes_off(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor=.*could not find the monitored key")
        yield


def _effft_epoch_seconds(root: Path, out: Path, *, arch: str, image_size: int, batch_size: int, workers: int,
                         lr: float, seed: int) -> float:
    """One training epoch of `effft fit` on the same data (no validation or test pass)."""
    from ..config.load import validate
    from ..runs.build import build, make_trainer, recipe_weights

    recipe = validate({
        "name": "bench", "seed": seed, "output_dir": str(out),
        "model": {"arch": arch, "pretrained": False},
        "data": {"adapter": "folder", "root": str(root), "image_size": image_size, "batch_size": batch_size,
                 "num_workers": workers, "split": {"train": 0.98, "val": 0.01, "test": 0.01}},
        "optimizer": {"lr": lr}, "trainer": {"max_epochs": 1, "accelerator": "cpu", "limit_val_batches": 0},
    })
    built = build(recipe, weights=recipe_weights(recipe), progress=False)
    trainer = make_trainer(recipe, out / "bench", task=built.data.task, classes=built.data.classes, quiet=True)
    start = time.perf_counter()
    with _notes_off():
        trainer.fit(built.module, datamodule=built.datamodule)
    return time.perf_counter() - start


def run_fit_bench(args: argparse.Namespace) -> int:
    import tempfile

    if not args.root or not Path(args.root).is_dir():
        raise EffftError("effft bench fit needs --root, a folder of class folders "
                         "(e.g. datasets/quickstart_digits from datasets/make_quickstart.py)")
    root = Path(args.root)
    workers = 1 if args.workers is None else args.workers
    common = dict(arch=args.model, image_size=args.image_size, batch_size=args.batch_size,
                  workers=workers, lr=1e-3, seed=0)
    if args.threads:
        torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"effft": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["effft", "reference"] if r % 2 == 0 else ["reference", "effft"]
            for key in order:
                if key == "effft":
                    times[key].append(_effft_epoch_seconds(root, Path(tmp) / f"r{r}", **common))
                else:
                    times[key].append(_reference_epoch_seconds(root, **common))
    ratios = [ref / ours for ours, ref in zip(times["effft"], times["reference"])]
    table = Table(title=f"one training epoch on {root}: {args.model}, {args.image_size} px, batch {args.batch_size}, "
                        f"{workers} loader workers, {torch.get_num_threads()} threads")
    for col in ("", "effft fit s", "Lightning + timm s", "speed ratio effft/reference"):
        table.add_column(col, justify="right")
    table.add_row("median", f"{statistics.median(times['effft']):.1f}", f"{statistics.median(times['reference']):.1f}",
                  f"{statistics.median(ratios):.3f}")
    console.print(table)
    return 0


# ----------------------------------------------------------------------------- a recipe's epoch


class _EpochClock(L.Callback):
    """Times the first training epoch, from its start to its end (data, steps, logging, weight
    averaging; not the checkpoints written after it), and ends the run there: the run is
    planned as the recipe's whole run (the EMA's decay and update interval, the schedule), so
    the epoch timed is one of that run."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        trainer.should_stop = True


def _bench_recipe(recipe: Any, out: Path) -> Any:
    """The recipe as the bench runs it: its epochs planned (the clock ends it after the first),
    no validation pass, what `finetune.strategy` would freeze early on left trainable (a later
    epoch's cost; `freeze_bottom` still holds)."""
    trainer = {**recipe.trainer, "max_epochs": int(recipe.trainer.get("max_epochs") or 10), "limit_val_batches": 0,
               "num_sanity_val_steps": 0}
    trainer.pop("budget", None)
    trainer.pop("max_time", None)
    return recipe.model_copy(update={
        "trainer": trainer, "output_dir": out, "name": "bench",
        "finetune": recipe.finetune.model_copy(update={"strategy": "full"}),
        "monitor": recipe.monitor.model_copy(update={"early_stopping_patience": None}),
    })


def _recipe_epoch(recipe: Any) -> float:
    """Seconds of one training epoch of `effft fit` (see `_EpochClock`), run in the recipe's run
    directory."""
    from ..runs.build import build, make_trainer, recipe_weights

    built = build(recipe, weights=recipe_weights(recipe), progress=False)
    trainer = make_trainer(recipe, recipe.run_dir, task=built.data.task, classes=built.data.classes, quiet=True)
    clock = _EpochClock()
    trainer.callbacks.append(clock)
    with _notes_off():
        trainer.fit(built.module, datamodule=built.datamodule)
    return clock.seconds[0]


def _bare_epoch(recipe: Any) -> float:
    """Seconds of the bare forward, backward and optimiser step over the same epoch's batches,
    made beforehand: the same network, memory format, frozen stages and optimiser (its parameter
    groups included), no framework around it."""
    from ..runs.build import build, recipe_weights
    from ..train.freezing import Freezing

    built = build(recipe, weights=recipe_weights(recipe), progress=False)
    dm, module = built.datamodule, built.module
    dm.setup("fit")
    batches = [(x, y) for x, y, _ in dm.train_dataloader()]
    module.train()
    Freezing(recipe.finetune).apply(module, 0)
    optimizer = module.make_optimizer()
    start = time.perf_counter()
    for x, y in batches:
        loss = module.loss_fn(module(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def run_recipe_fit_bench(args: argparse.Namespace) -> int:
    """`effft bench fit RECIPE`: a training epoch of the recipe's run against the bare steps of
    the same batches; the ratio is what effft's loop costs above the network's own work."""
    import tempfile

    from ..config.load import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"effft": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            bench = _bench_recipe(recipe, Path(tmp) / f"r{r}")
            for key in (["effft", "bare"] if r % 2 == 0 else ["bare", "effft"]):
                times[key].append(_recipe_epoch(bench) if key == "effft" else _bare_epoch(bench))
    ratios = [ours / bare for ours, bare in zip(times["effft"], times["bare"])]
    d = recipe.data
    table = Table(title=f"one training epoch of {args.recipe}: {recipe.model.arch}, {d.image_size} px, batch "
                        f"{d.batch_size}, {torch.get_num_threads()} threads, median of {args.rounds}")
    for col in ("effft fit epoch s", "bare steps s", "overhead effft/bare"):
        table.add_column(col, justify="right")
    table.add_row(f"{statistics.median(times['effft']):.2f}", f"{statistics.median(times['bare']):.2f}",
                  f"{statistics.median(ratios):.3f}")
    console.print(table)
    return 0
