"""`effft bench quality`: `effft fit` as a recipe says against the plain loop, on the same split.

Both run as processes of their own, one after the other, with the same threads, weights, input
size, epochs and batch size, and both are timed as whole commands (imports, data, training,
evaluation, and for effft its reports). The loop (`bench/loop.py`) trains on the train split of
the run's `splits.csv` and predicts its test split. Both are scored by one function on their
test probabilities: accuracy and balanced accuracy (effft at its own decision rule, the loop at
the argmax), AUROC, ECE (15 bins, top-label confidence) and NLL. Beside each ECE stands the ECE a
perfectly calibrated model with the same confidences would show on a split of this size: on a
test split of a few hundred images that is far from 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.table import Table

from ..console import console
from ..errors import EffftError

METRICS = ("accuracy", "balanced_accuracy", "auroc", "ece", "ece_if_calibrated", "nll")


def score(probs: np.ndarray, targets: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """The figures of one model's test predictions: probs (N, C), targets and predicted (N,)."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from torchmetrics.functional.classification import multiclass_calibration_error

    from ..evaluate.metrics import ECE_BINS, calibrated_ece

    c = probs.shape[1]
    p = np.clip(probs, 1e-12, 1.0)
    both = len(np.unique(targets)) > 1
    if c == 2:
        auroc = roc_auc_score(targets, probs[:, 1]) if both else math.nan
    else:
        present = np.unique(targets)
        auroc = roc_auc_score(targets, probs[:, present] / probs[:, present].sum(1, keepdims=True),
                              multi_class="ovr", labels=present) if len(present) > 2 else math.nan
    ece = multiclass_calibration_error(torch.from_numpy(probs).float(), torch.from_numpy(targets).long(), c,
                                       n_bins=ECE_BINS)
    return {
        "accuracy": float((predicted == targets).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(targets, predicted)),
        "auroc": float(auroc),
        "ece": float(ece),
        "ece_if_calibrated": calibrated_ece(torch.from_numpy(probs.max(1)))[0],
        "nll": float(-np.log(p[np.arange(len(targets)), targets]).mean()),
    }


def _effft_predictions(run_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(run_dir / "report" / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    targets = np.array([classes.index(r["target"]) for r in rows])
    predicted = np.array([classes.index(r["predicted"]) for r in rows])
    return probs, targets, predicted


def _timed(command: list[str], env: dict[str, str], what: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise EffftError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def _loop_config(recipe: Any, run_dir: Path, work: Path, *, threads: int) -> dict[str, Any]:
    """What the loop needs, from the finished run: its split, its weights (as timm's layout) and
    the preprocessing of those weights."""
    from safetensors.torch import save_file

    from ..model.registry import create_model
    from ..runs.build import recipe_weights
    from ..runs.layout import load_checkpoint_meta

    _, meta = load_checkpoint_meta(run_dir)
    weights = recipe_weights(recipe)
    if weights is None:
        raise EffftError("effft bench quality compares fine-tuning from pretrained weights: the recipe has "
                         "model.pretrained: false")
    model = create_model(recipe.model.arch, pretrained=weights)  # 1000 classes, timm's layout
    save_file(model.state_dict(), work / "weights.safetensors")
    pre, size = meta["preprocessing"], int(meta["input"]["size"])
    return {
        "splits": str(run_dir / "splits.csv"), "classes": list(meta["classes"]), "arch": recipe.model.arch,
        "weights": str(work / "weights.safetensors"), "size": size, "mean": list(pre["mean"]),
        "std": list(pre["std"]), "crop_pct": float(pre["crop_pct"]), "interpolation": str(pre["interpolation"]),
        "epochs": int(recipe.trainer.get("max_epochs", 10)), "batch_size": recipe.data.batch_size,
        "workers": recipe.data.workers(), "threads": threads, "seed": recipe.seed, "out": str(work / "loop.npz"),
    }


def run_effft(recipe_path: Path, overrides: list[str], *, work: Path, threads: int) -> tuple[Any, float]:
    """`effft fit` of the recipe into `work/effft`, as its own process: (the recipe, seconds)."""
    from ..config.load import load_recipe

    recipe = load_recipe(recipe_path, list(overrides) + [f"output_dir={work}", "name=effft"])
    if recipe.data.adapter == "dicom":
        raise EffftError("effft bench quality reads images as a plain loop does (PIL or a .npz); DICOM is not one of them")
    written = work / "recipe.yaml"
    written.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    seconds = _timed([sys.executable, "-m", "effft.cli", "-q", "fit", str(written), "--overwrite"], env, "effft fit")
    return recipe, seconds


def run_loop(config: dict[str, Any], *, work: Path, threads: int) -> float:
    """The plain loop as its own process, writing its test predictions to `config["out"]`: seconds."""
    (work / "loop.json").write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return _timed([sys.executable, "-m", "effft.bench.loop", str(work / "loop.json")], env, "the plain loop")


def compare(recipe_path: Path, overrides: list[str], *, work: Path, threads: int) -> dict[str, dict[str, float]]:
    """Run both; {"effft": figures, "loop": figures}, each with "seconds"."""
    recipe, effft_s = run_effft(recipe_path, overrides, work=work, threads=threads)
    run_dir = work / "effft"
    config = _loop_config(recipe, run_dir, work, threads=threads)
    loop_s = run_loop(config, work=work, threads=threads)
    classes = config["classes"]
    ours = score(*_effft_predictions(run_dir, classes))
    with np.load(work / "loop.npz") as z:
        theirs = score(z["probs"], z["targets"], z["probs"].argmax(1))
    return {"effft": {**ours, "seconds": effft_s}, "loop": {**theirs, "seconds": loop_s}}


def run_quality_bench(args: argparse.Namespace) -> int:
    threads = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = compare(Path(args.recipe), args.set, work=work, threads=threads)
    table = Table(title=f"{args.recipe}: effft fit against the plain loop, same split, {threads} threads")
    for col in ("", "effft", "plain loop", "effft / loop"):
        table.add_column(col, justify="right")
    for name in (*METRICS, "seconds"):
        ours, theirs = results["effft"][name], results["loop"][name]
        ratio = ours / theirs if theirs else math.nan
        table.add_row(name, f"{ours:.4f}", f"{theirs:.4f}", f"{ratio:.3f}")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
