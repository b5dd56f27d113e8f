"""`effft cv RECIPE --folds K`: every fold of a K-fold cross-validation, and their pooled figures.

The test split is cut once, as the recipe says, and shared by every fold. The rest is cut into K
parts (stratified, and grouped by patient where the data have groups). Fold k trains on K - 2
parts, validates on part k + 1 (which chooses its checkpoint, threshold, temperature and early
stop) and leaves part k out entirely; part k is then predicted by fold k's model. So each
non-test image is predicted once, by a model it never trained or chose, and the pooled
out-of-fold figures are honest.

Layout: `<output_dir>/<name>/fold-<k>/` is an ordinary run directory (its splits.csv marks part k
"unused"); beside the folds, `cv.json`, `oof_predictions.csv` and `report.html`. A finished fold
is not run again, an interrupted one resumes from its last.ckpt, so the command can simply be
given again after a crash.

Results: the pooled out-of-fold figures with intervals, mean and sd across folds, and the test
split scored by the ensemble of the fold models (the mean of their calibrated probabilities;
binary: at the mean of their thresholds) against the single fold that validated best.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config.schema import Recipe
from ..console import console
from ..data.dataset import load_data
from ..data.splits import UNUSED, assign_splits, label_text, write_splits
from ..errors import RecipeError
from ..evaluate.intervals import group_labels, split_intervals
from ..paths import atomic_write
from ..report.html import write_cv_report
from .fit import fit
from .jobs import launched_first
from .layout import CHECKPOINTS
from .results import jsonable

log = logging.getLogger(__name__)

SUMMARY_FIGURES = {"binary": ("auroc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "ece"),
                   "multiclass": ("accuracy", "balanced_accuracy", "auroc", "ece")}


def fold_dir(recipe: Recipe, k: int) -> Path:
    return recipe.run_dir / f"fold-{k}"


def _parts(recipe: Recipe, folds: int) -> tuple[Any, list[Any], list[set[int]]]:
    """The loaded data, its items with the shared test split marked (the rest unmarked), and the
    K parts of the non-test pool (sets of item indices)."""
    split = recipe.data.split.model_copy(update={"folds": folds, "fold": 0})
    data = load_data(recipe.data.model_copy(update={"split": split}), channels=recipe.model.in_chans,
                     seed=recipe.seed, progress=False, positive_class=recipe.metrics.positive_class)
    if data.task == "multilabel":
        raise RecipeError("effft cv pools single-label figures; this data set is multi-label")
    given = {(it.path, it.frame): it.split for it in data.source.items}
    base = [replace(it, split=given.get((it.path, it.frame))) for it in data.items]
    cuts = [assign_splits(base, split.model_copy(update={"fold": j}), seed=recipe.seed) for j in range(folds)]
    parts = [{i for i, it in enumerate(cut) if it.split == "val"} for cut in cuts]
    return data, cuts[0], parts  # the test split is the same in every cut


def _fold_items(items: list[Any], parts: list[set[int]], k: int) -> list[Any]:
    """Fold k's split: the shared test, part k unused, part k + 1 val, the rest train."""
    held, val = parts[k], parts[(k + 1) % len(parts)]
    out = []
    for i, it in enumerate(items):
        if it.split == "test":
            out.append(it)
        else:
            out.append(replace(it, split=UNUSED if i in held else "val" if i in val else "train"))
    return out


@contextmanager
def _splits_file(items: list[Any], classes: list[str]) -> Iterator[Path]:
    """`items` written as a splits.csv in a temporary folder, for as long as the block runs."""
    with tempfile.TemporaryDirectory(prefix="effft-cv-") as scratch:
        path = Path(scratch) / "splits.csv"
        write_splits(path, items, classes)
        yield path


def _run_fold(recipe: Recipe, k: int, fold_items: list[Any], classes: list[str], *, quiet: bool,
              overwrite: bool, command: str) -> Path:
    """Fit fold k, or resume it, or leave it be when finished."""
    run_dir = fold_dir(recipe, k)
    fold = recipe.model_copy(update={"name": f"fold-{k}", "output_dir": recipe.run_dir})
    finished = (run_dir / "metrics.json").exists() and (run_dir / CHECKPOINTS / "best.ckpt").exists()
    say = launched_first()  # under DDP every process runs this loop: the first one speaks
    if finished and not overwrite:
        if say:
            console.print(f"fold {k}: finished before, kept ({run_dir})", markup=False)
        return run_dir
    resume = (run_dir / CHECKPOINTS / "last.ckpt").exists() and not overwrite
    if say:
        console.print(f"fold {k} of {recipe.run_dir.name}: {'resuming' if resume else 'training'}", markup=False)
    with _splits_file(fold_items, classes) as splits:
        fit(fold, resume=resume, overwrite=not resume, quiet=quiet, command=command, splits_file=splits)
    return run_dir


def _held_out_predictions(run_dir: Path, fold_items: list[Any], classes: list[str]) -> dict[str, Any]:
    """Fold k's model on its part k (its splits marked: part k test, the rest train)."""
    from .test import predict_split

    marked = [replace(it, split="test" if it.split == UNUSED else "train") for it in fold_items]
    with _splits_file(marked, classes) as splits:
        return predict_split(run_dir, splits)


def leakage(fold_items_by_k: dict[int, list[Any]]) -> dict[str, Any]:
    """Whether any group (patient) sits in two of train, val, test and the held-out part of a fold."""
    problems = []
    for k, items in sorted(fold_items_by_k.items()):
        where: dict[str, set[str]] = {}
        for it in items:
            if it.group is not None:
                where.setdefault(it.group, set()).add(it.split)
        crossing = sorted(g for g, splits in where.items() if len(splits) > 1)
        problems += [f"fold {k}: group {g!r} is in {', '.join(sorted(where[g]))}" for g in crossing[:20]]
    grouped = any(it.group is not None for items in fold_items_by_k.values() for it in items)
    return {"ok": not problems, "grouped": grouped, "problems": problems}


def _test_predictions(run_dir: Path, classes: list[str]) -> dict[str, np.ndarray]:
    with open(run_dir / "report" / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {"paths": np.array([r["path"] for r in rows]),
            "probs": np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows]),
            "targets": np.array([classes.index(r["target"]) for r in rows])}


def _best_fold(recipe: Recipe, metrics: dict[int, dict[str, Any]]) -> int:
    """The fold whose validation scored best by the recipe's monitor (val chose it, not test)."""
    from ..evaluate.metrics import metric_direction

    name = recipe.monitor.metric.split("/", 1)[-1]
    sign = 1 if metric_direction(name) == "min" else -1
    scores = {k: m.get("val", {}).get(name) for k, m in metrics.items()}
    scored = {k: v for k, v in scores.items() if v is not None and math.isfinite(v)}
    return min(scored, key=lambda k: sign * scored[k]) if scored else min(metrics)


def cross_validate(recipe: Recipe, *, folds: int, quiet: bool = False, overwrite: bool = False,
                   command: str = "effft cv RECIPE") -> Path:
    """Run (or finish) every fold, then pool them; returns `<output_dir>/<name>/`."""
    if recipe.task == "embedding":
        raise RecipeError("effft cv pools a classifier's out-of-fold predictions; an embedding run (task: embedding) "
                          "is judged on people it never saw by effft fit itself: use effft fit")
    if folds < 3:
        raise RecipeError(f"--folds {folds}: effft cv needs at least 3 (each fold trains on K - 2 parts, "
                          "validates on one and leaves one out)")
    data, items, parts = _parts(recipe, folds)
    classes, task = data.classes, data.task
    by_fold = {k: _fold_items(items, parts, k) for k in range(folds)}
    checked = leakage(by_fold)
    if not checked["ok"]:  # a bug, not a user error: the splitter keeps groups whole
        raise RuntimeError("cross-validation folds share patients: " + "; ".join(checked["problems"]))
    for k in range(folds):
        _run_fold(recipe, k, by_fold[k], classes, quiet=quiet, overwrite=overwrite, command=command)
    return pool(recipe, folds=folds, by_fold=by_fold, classes=classes, task=task, checked=checked)


def pool(recipe: Recipe, *, folds: int, by_fold: dict[int, list[Any]], classes: list[str], task: str,
         checked: dict[str, Any]) -> Path:
    """cv.json, oof_predictions.csv and report.html from the finished folds. Under DDP every
    process runs this (the held-out parts are predicted by all of them together); the first alone
    writes and speaks."""
    root, seed = recipe.run_dir, recipe.seed
    metrics = {k: json.loads((fold_dir(recipe, k) / "metrics.json").read_text()) for k in range(folds)}
    oof = {k: _held_out_predictions(fold_dir(recipe, k), by_fold[k], classes) for k in range(folds)}
    paths = [p for k in range(folds) for p in oof[k]["paths"]]
    probs = np.concatenate([oof[k]["probs"] for k in range(folds)])
    y = np.concatenate([oof[k]["targets"] for k in range(folds)])
    thresholds = np.concatenate([np.full(len(oof[k]["targets"]), oof[k]["threshold"]) for k in range(folds)])
    fold_of = np.concatenate([np.full(len(oof[k]["targets"]), k) for k in range(folds)])
    groups = group_labels([g for k in range(folds) for g in oof[k]["groups"]])
    pooled = split_intervals(task, probs, y, threshold=thresholds, groups=groups, seed=seed)
    # each fold's own figures (their values only: the spread across folds is the interval here)
    per_fold = {k: split_intervals(task, oof[k]["probs"], oof[k]["targets"], threshold=oof[k]["threshold"],
                                   seed=seed, resamples=1) for k in range(folds)}
    names = SUMMARY_FIGURES[task]
    mean_sd = {}
    for name in names:
        v = np.array([per_fold[k][name]["value"] for k in range(folds)], dtype=float)
        v = v[np.isfinite(v)]
        mean_sd[name] = {"mean": float(v.mean()) if len(v) else None,
                         "sd": float(v.std(ddof=1)) if len(v) > 1 else None}
    result: dict[str, Any] = {
        "folds": [{"fold": k, "val": metrics[k].get("val", {}), "test": metrics[k].get("test", {}),
                   "out_of_fold": {n: per_fold[k][n]["value"] for n in names}, "held_out": len(oof[k]["targets"])}
                  for k in range(folds)],
        "out_of_fold": pooled, "mean_sd": mean_sd, "leakage": checked,
    }
    tests = {k: _test_predictions(fold_dir(recipe, k), classes) for k in range(folds)
             if (fold_dir(recipe, k) / "report" / "predictions.csv").exists() and metrics[k].get("test")}
    if len(tests) == folds:
        order = np.argsort(tests[0]["paths"])
        aligned = [tests[k]["probs"][np.argsort(tests[k]["paths"])] for k in range(folds)]
        ensemble = np.mean(aligned, axis=0)
        threshold = float(np.mean([oof[k]["threshold"] for k in range(folds)]))
        test_y = tests[0]["targets"][order]
        result["ensemble_test"] = split_intervals(task, ensemble, test_y, threshold=threshold, seed=seed)
        best = _best_fold(recipe, metrics)
        result["best_fold"] = {"fold": best, "test": metrics[best].get("intervals", {}).get("test", {})}
    if not launched_first():
        return root
    _write_oof(root / "oof_predictions.csv", paths, probs, y, fold_of, classes)
    with atomic_write(root / "cv.json") as tmp:
        tmp.write_text(json.dumps(jsonable(result), indent=2))
    write_cv_report(root)  # each fold's own report.html was written by its fit
    _show(result, names, root)
    return root


def _write_oof(path: Path, paths: list[str], probs: np.ndarray, y: np.ndarray, fold_of: np.ndarray,
               classes: list[str]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "fold", "target", *[f"prob_{c}" for c in classes]])
        for p, k, t, row in zip(paths, fold_of, y, probs):
            w.writerow([p, int(k), label_text(int(t), classes), *[f"{v:.9g}" for v in row]])


def _show(result: dict[str, Any], names: tuple[str, ...], root: Path) -> None:
    from rich.table import Table

    def cell(f: dict[str, Any] | None) -> str:
        if not f or f.get("value") is None or not math.isfinite(f["value"]):
            return "n/a"
        low, high = f.get("low"), f.get("high")
        ci = f" ({low:.3f}-{high:.3f})" if low is not None and high is not None else ""
        return f"{f['value']:.4f}{ci}"

    table = Table(title=f"cross-validation, {len(result['folds'])} folds")
    for col in ("metric", "out-of-fold, pooled", "mean ± sd of folds", "test: ensemble", "test: best fold"):
        table.add_column(col, justify="right")
    for name in names:
        ms = result["mean_sd"].get(name, {})
        spread = f"{ms['mean']:.4f} ± {ms['sd']:.4f}" if ms.get("mean") is not None and ms.get("sd") is not None \
            else "n/a"
        table.add_row(name, cell(result["out_of_fold"].get(name)), spread,
                      cell(result.get("ensemble_test", {}).get(name)),
                      cell(result.get("best_fold", {}).get("test", {}).get(name)))
    console.print(table)
    leak = result["leakage"]
    console.print("leakage check: " + ("no patient is in two splits of any fold" if leak["grouped"] else
                                       "no groups given: images are split one by one"), markup=False)
    console.print(f"cross-validation directory: {root}", markup=False)
