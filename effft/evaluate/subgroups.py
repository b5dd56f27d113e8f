"""Test figures per subgroup (site, sex, age band, ...), each with its 95% interval.

Every subgroup of every column given in `report.subgroups` is scored as the whole split is
(`intervals.py`: the same threshold, the same bootstrap, grouped by patient where the split is),
and flagged where its figures say little: fewer than MIN_IMAGES images, or for binary tasks no
positive or no negative.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .intervals import split_intervals

MIN_IMAGES = 30
# the figures a subgroup row reports, by task
FIGURES = {"binary": ("auroc", "sensitivity", "specificity", "accuracy"),
           "multiclass": ("accuracy", "balanced_accuracy", "auroc")}
HEADLINE = {"binary": "auroc", "multiclass": "accuracy"}


def _warning(task: str, y: np.ndarray) -> str:
    notes = []
    if len(y) < MIN_IMAGES:
        notes.append(f"fewer than {MIN_IMAGES} images")
    if task == "binary" and (y == 1).sum() == 0:
        notes.append("no positives")
    if task == "binary" and (y == 0).sum() == 0:
        notes.append("no negatives")
    return "; ".join(notes)


def subgroup_rows(task: str, probs: np.ndarray, y: np.ndarray, columns: dict[str, list[str]], *,
                  threshold: float | None, groups: np.ndarray | None, seed: int,
                  resamples: int = 2000) -> list[dict[str, Any]]:
    """Rows (column, subgroup, n, positives, metric, value, low, high, warning): per column and
    value in `columns` ({column: the value of each prediction}), per figure of FIGURES[task]."""
    rows = []
    for column, values in columns.items():
        values_arr = np.asarray(values, dtype=object)
        for value in sorted(set(values), key=str):
            at = values_arr == value
            yy, pp = y[at], probs[at]
            gg = groups[at] if groups is not None else None
            figures = split_intervals(task, pp, yy, threshold=threshold, groups=gg, seed=seed, resamples=resamples)
            warning = _warning(task, yy)
            for metric in FIGURES[task]:
                f = figures[metric]
                rows.append({"column": column, "subgroup": str(value), "n": int(at.sum()),
                             "positives": int((yy == 1).sum()) if task == "binary" else None,
                             "metric": metric, "value": f["value"], "low": f["low"], "high": f["high"],
                             "warning": warning})
    return rows
