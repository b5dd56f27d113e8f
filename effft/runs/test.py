"""`effft test`: re-evaluate a finished run, on its own test split or on other data.

The run is rebuilt from its checkpoint alone: the recipe, the weights and the InputSpec inside
it. With `--set data.*` other data are read, and every image there is evaluated. Where the
run's data folder is gone and `--set data.root=...` gives its new place (and nothing else about
the data changes), the data are taken to have moved: the run's own test split is evaluated.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import tempfile
from pathlib import Path

from ..config.load import apply_overrides, check_paths, validate
from ..errors import EffftError
from ..paths import atomic_write
from .build import Trained, build, check_processes, make_trainer
from .jobs import distributed_job
from .layout import load_checkpoint_meta, run_dir_of
from .embedding import shown_results, write_evaluation
from .results import show_results

log = logging.getLogger(__name__)


def test(target: Path, *, overrides: list[str] | None = None, quiet: bool = False) -> dict[str, float]:
    """Re-evaluate a finished run (its test split, or with --set data.* other data)."""
    ckpt, meta = load_checkpoint_meta(target)
    raw = apply_overrides(copy.deepcopy(meta["recipe"]), list(overrides or []))
    recipe = validate(raw, source=f"recipe in {ckpt}")
    trained_on = meta["recipe"]["data"]
    if raw["data"] == trained_on and not recipe.data.root.exists():
        raise EffftError(f"the data this run was trained on are no longer at {recipe.data.root} (data.root of the "
                         f"recipe in {ckpt}): if they moved, give their new place: "
                         f"effft test {target} --set data.root=NEW_PLACE")
    check_paths(recipe, source=f"recipe in {ckpt}")
    run_dir = run_dir_of(ckpt)
    moved = raw["data"] == {**trained_on, "root": raw["data"]["root"]} and raw["data"] != trained_on \
        and not Path(trained_on["root"]).exists() and (run_dir / "splits.csv").exists()
    with tempfile.TemporaryDirectory(prefix="effft-test-") as scratch:
        own = raw["data"] == trained_on and (run_dir / "splits.csv").exists()
        splits_file = run_dir / "splits.csv" if own else None
        if moved:
            splits_file = _moved_splits(run_dir / "splits.csv", trained_on["root"], recipe.data.root, Path(scratch))
        same_data = splits_file is not None or raw["data"] == trained_on
        built = build(recipe, splits_file=splits_file, trained=Trained(ckpt, meta), test_only=not same_data,
                      progress=not quiet)
    if built.data.classes != meta["classes"] and recipe.task != "embedding":  # an embedding meets new people
        raise EffftError(f"the data at {recipe.data.root} has classes {built.data.classes}, "
                         f"but the model was trained on {meta['classes']}")
    data = built.data
    if not data.split_items("test"):
        raise EffftError(f"the data at {recipe.data.root} has no test split to evaluate")
    trainer = make_trainer(recipe, run_dir, task=data.task, classes=data.classes, quiet=quiet, fit=False)
    check_processes(trainer, data, ("test",))
    with distributed_job(trainer, next_step=lambda: "the evaluation did not finish, and nothing of it was written"):
        trainer.test(built.module, datamodule=built.datamodule, verbose=False)
        results = {"test": built.module.results["test"]}
        if trainer.is_global_zero:
            out = run_dir / "tests" / ("same_data" if same_data else "other_data")
            out.mkdir(parents=True, exist_ok=True)
            written = write_evaluation(out, built, results, run_files=run_dir)
            show_results(shown_results(built, results, written), out, built.weights,
                         intervals=written.get("intervals"))
    return results["test"]


def _moved_splits(splits: Path, old_root: str, new_root: Path, scratch: Path) -> Path | None:
    """The run's splits.csv with its files moved from `old_root` to `new_root`, written into
    `scratch`; None where a file of it was not under `old_root`."""
    with open(splits, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)
    old = Path(os.path.abspath(old_root))
    for row in rows:
        try:
            row["path"] = str(Path(new_root) / Path(os.path.abspath(row["path"])).relative_to(old))
        except (KeyError, ValueError):
            log.warning("the files of %s are not all under %s: every image at %s is evaluated", splits, old_root,
                        new_root)
            return None
    log.info("the data moved from %s to %s: evaluating the run's own test split there", old_root, new_root)
    out = scratch / "splits.csv"
    with atomic_write(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return out


def predict_split(target: Path, splits_file: Path) -> dict[str, object]:
    """A finished run's predictions for the items `splits_file` marks as test (the others are
    not read): {"paths", "probs" (calibrated, N x C), "targets", "threshold"}. Nothing is
    written; `effft cv` scores each fold's held-out part with it."""
    ckpt, meta = load_checkpoint_meta(target)
    recipe = validate(copy.deepcopy(meta["recipe"]), source=f"recipe in {ckpt}")
    built = build(recipe, splits_file=splits_file, trained=Trained(ckpt, meta), progress=False)
    with tempfile.TemporaryDirectory(prefix="effft-predict-") as scratch:
        trainer = make_trainer(recipe, Path(scratch), task=built.data.task, classes=built.data.classes, quiet=True,
                               fit=False)
        trainer.test(built.module, datamodule=built.datamodule, verbose=False)
    preds = built.module.predictions["test"]
    items = built.data.split_items("test")
    return {"paths": [items[i].path for i in preds["index"].tolist()], "probs": preds["probs"].double().numpy(),
            "targets": preds["targets"].long().numpy(), "threshold": float(built.module.threshold),
            "groups": [items[i].group for i in preds["index"].tolist()]}
