"""`effft bench intervals`: effft's bootstrap intervals against the loop a careful user writes.

Both draw the same number of stratified resamples of the same N predictions (binary: AUROC,
average precision and ECE). The reference loops over the resamples and scores each with
scikit-learn (`roc_auc_score`, `average_precision_score`) and torchmetrics' ECE; effft scores
blocks of resamples at once as weights (`evaluate/intervals.py`). Timed alternately, as ratios.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import numpy as np
import torch
from ..console import console
from ..evaluate.intervals import binary_intervals
from ..evaluate.metrics import ECE_BINS
from .rounds import alternate, print_table


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return 1 / (1 + np.exp(-rng.normal(1.5 * (2 * y - 1), 1.5))), y


def reference_intervals(p1: np.ndarray, y: np.ndarray, *, resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """Stratified resamples scored one by one with scikit-learn and torchmetrics."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    from torchmetrics.functional.classification import binary_calibration_error

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    values: dict[str, list[float]] = {"auroc": [], "average_precision": [], "ece": []}
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        values["auroc"].append(roc_auc_score(y[idx], p1[idx]))
        values["average_precision"].append(average_precision_score(y[idx], p1[idx]))
        values["ece"].append(float(binary_calibration_error(torch.from_numpy(p1[idx]), torch.from_numpy(y[idx]),
                                                            n_bins=ECE_BINS)))
    return {k: tuple(np.quantile(v, [0.025, 0.975])) for k, v in values.items()}  # type: ignore[misc]


def run_intervals_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    n, resamples = args.predictions, args.resamples
    p1, y = _data(n)
    found: dict[str, dict] = {}
    seeds = {"effft": itertools.count(), "reference": itertools.count()}  # round r draws with seed r

    def ours() -> None:
        found["effft"] = binary_intervals(p1, y, threshold=0.5, resamples=resamples, seed=next(seeds["effft"]))

    def theirs() -> None:
        found["reference"] = reference_intervals(p1, y, resamples=resamples, seed=next(seeds["reference"]))

    times = alternate(args.rounds, {"effft": ours, "reference": theirs})
    effft_s, ref_s = statistics.median(times["effft"]), statistics.median(times["reference"])
    print_table(f"bootstrap intervals of {n} binary predictions, {resamples} stratified resamples, median of "
                f"{args.rounds}", ("", "effft s", "scikit-learn loop s", "speed ratio reference/effft"),
                [("AUROC, AP, ECE", f"{effft_s:.2f}", f"{ref_s:.2f}", f"{ref_s / effft_s:.1f}")])
    auroc = found["effft"]["auroc"]
    console.print(f"last round's AUROC interval: effft {auroc['low']:.4f}-{auroc['high']:.4f}, reference "
                  f"{found['reference']['auroc'][0]:.4f}-{found['reference']['auroc'][1]:.4f} (other resamples)",
                  markup=False)
    return 0
