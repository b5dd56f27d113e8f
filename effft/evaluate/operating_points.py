"""Operating points of a binary model: the thresholds a clinician would run it at, each chosen on
the validation split and then applied unchanged to test.

- the run's own threshold (`metrics.threshold`, chosen on val);
- the highest threshold reaching a sensitivity of 0.90, and of 0.95, on val;
- 0.5.

At each: sensitivity, specificity, PPV, NPV (with Wilson intervals), F1, and the counts TP, FP,
TN, FN on test. A target sensitivity met on val is not promised on test: the table shows what
test gave.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .intervals import wilson
from .metrics import choose_threshold

TARGET_SENSITIVITIES = (0.90, 0.95)


def operating_thresholds(val_p1: torch.Tensor, val_y: torch.Tensor, *, chosen: float,
                         method: str) -> dict[str, float]:
    """{name: threshold}: the run's threshold, those reaching each target sensitivity on val
    (left out where val lacks a class), and 0.5."""
    out = {f"run's threshold ({method}, on val)": float(chosen)}
    y = val_y.long()
    if y.numel() and 0 < int(y.sum()) < y.numel():
        for target in TARGET_SENSITIVITIES:
            t = choose_threshold(val_p1, y, method="sensitivity", target_sensitivity=target)
            out[f"sensitivity >= {target:.2f} on val"] = float(t)
    out["0.5"] = 0.5
    return out


def operating_points(p1: np.ndarray, y: np.ndarray, thresholds: dict[str, float]) -> list[dict[str, object]]:
    """One row per threshold: its name and value, TP, FP, TN, FN, and sensitivity, specificity,
    PPV, NPV (each with `_low`/`_high`, Wilson) and F1 on these predictions."""
    p1, y = np.asarray(p1, np.float64), np.asarray(y).astype(int)
    rows = []
    for name, t in thresholds.items():
        pred = p1 >= t
        tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
        tn, fn = int((~pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
        row: dict[str, object] = {"operating_point": name, "threshold": float(t),
                                  "tp": tp, "fp": fp, "tn": tn, "fn": fn}
        for figure, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                             ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
            low, high = wilson(k, n)
            row[figure] = k / n if n else math.nan
            row[f"{figure}_low"], row[f"{figure}_high"] = low, high
        row["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
        rows.append(row)
    return rows
