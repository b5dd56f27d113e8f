"""Confidence intervals for the test figures.

- Proportions of independent images (accuracy, sensitivity, specificity, PPV, NPV): Wilson
  score intervals (scipy's `binomtest(...).proportion_ci(method="wilson")`).
- Everything else (AUROC, average precision, F1, balanced accuracy, ECE), and the proportions
  too where images come in groups: a stratified bootstrap, percentile intervals, 2,000
  resamples by default, from a seeded generator (the same seed gives the same intervals).

Resampling is done as weights: a resample is how many times it draws each image, so every
figure becomes a weighted sum over the same sorted predictions, computed for a block of
resamples at once with numpy. Stratified: each class (binary: positives and negatives) is
drawn to its own size, so no resample lacks a class. Grouped (a patient's images are not
independent): whole groups are drawn, stratified by whether a group holds a positive (multi-
class: by the highest class index among its images), and each drawn group brings all its images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from .metrics import ECE_BINS

CONFIDENCE = 0.95
RESAMPLES = 2000
BLOCK = 200  # resamples computed at once: a (BLOCK, N) array of weights
WEIGHT = np.float32  # whole counts, exact in float32 for splits of up to 16 million images


def wilson(k: int, n: int, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials; (nan, nan) for n = 0."""
    from scipy.stats import binomtest

    if n <= 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


# ----------------------------------------------------------------------------- resampling


def _units(strata: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(the unit of each item, the stratum of each unit): items themselves, or their groups."""
    if groups is None:
        return np.arange(len(strata)), strata
    names, unit = np.unique(groups.astype(str), return_inverse=True)
    stratum = np.zeros(len(names), dtype=strata.dtype)
    # a group's stratum: its largest item stratum (binary: 1 where it holds a positive)
    np.maximum.at(stratum, unit, strata)
    return unit, stratum


def resample_weights(strata: np.ndarray, groups: np.ndarray | None, *, resamples: int,
                     seed: int) -> Iterator[np.ndarray]:
    """Blocks of (b, N) weights, b <= BLOCK: how often each of N items is drawn in each resample
    (see the module docstring)."""
    rng = np.random.default_rng(seed)
    unit, unit_stratum = _units(np.asarray(strata), groups)
    members = [np.flatnonzero(unit_stratum == s) for s in np.unique(unit_stratum)]
    n_units = len(unit_stratum)
    done = 0
    while done < resamples:
        b = min(BLOCK, resamples - done)
        flat = np.concatenate([(m[rng.integers(0, len(m), (b, len(m)))] + np.arange(b)[:, None] * n_units).ravel()
                               for m in members])
        counts = np.bincount(flat, minlength=b * n_units).reshape(b, n_units).astype(WEIGHT)
        yield counts[:, unit]
        done += b


def bootstrap(figures: Callable[[np.ndarray], dict[str, np.ndarray]], strata: np.ndarray,
              groups: np.ndarray | None = None, *, resamples: int = RESAMPLES, seed: int = 0,
              confidence: float = CONFIDENCE) -> dict[str, tuple[float, float]]:
    """The percentile interval of each figure `figures(weights)` gives (weights (b, N) -> {name:
    (b,) values}) over stratified (and grouped) resamples. Resamples where a figure is undefined
    (NaN) are left out of its interval; (nan, nan) when all are."""
    values: dict[str, list[np.ndarray]] = {}
    for w in resample_weights(strata, groups, resamples=resamples, seed=seed):
        for name, v in figures(w).items():
            values.setdefault(name, []).append(v)
    tail = (1 - confidence) / 2
    out = {}
    for name, parts in values.items():
        v = np.concatenate(parts)
        v = v[np.isfinite(v)]
        out[name] = (math.nan, math.nan) if not len(v) else tuple(float(q) for q in np.quantile(v, [tail, 1 - tail]))
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- weighted figures


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where den > 0, else NaN (a resample without any of what the figure counts)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def ranked(scores: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """For weights (b, N): the weighted positives and negatives scored at or above each distinct
    score, highest score first ((b, L) each, cumulative)."""
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], y[order].astype(WEIGHT)
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # the last item of each level

    def cumulative(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = w[:, order]
        tp = np.cumsum(w * pos, axis=1)[:, ends]
        everyone = np.cumsum(w, axis=1)[:, ends]
        return tp, everyone - tp

    return cumulative


def _step(cumulative: np.ndarray) -> np.ndarray:
    return np.diff(cumulative, axis=1, prepend=0.0)


def ranking(scores: np.ndarray, y: np.ndarray, *,
            average_precision: bool = True) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """AUROC and average precision of `scores` for labels `y` (0/1) under weights (b, N), both as
    scikit-learn defines them with sample_weight: AUROC the weighted chance that a positive
    outscores a negative, ties counting half; AP the step-wise area under precision-recall."""
    cumulative = ranked(scores, y)

    def figures(w: np.ndarray) -> dict[str, np.ndarray]:
        tp, fp = cumulative(w)
        positives, negatives = tp[:, -1], fp[:, -1]
        p, n = _step(tp), _step(fp)  # positives and negatives at each level
        below = negatives[:, None] - fp  # negatives scored lower than the level
        found = {"auroc": ratio((p * (below + n / 2)).sum(1), positives * negatives)}
        if average_precision:
            precision = np.nan_to_num(ratio(tp, tp + fp))
            found["average_precision"] = ratio((p * precision).sum(1), positives)
        return found

    return figures


def weighted_ece(confidence: np.ndarray, outcome: np.ndarray, *, n_bins: int = ECE_BINS) -> Callable[[np.ndarray], np.ndarray]:
    """ECE (bins as torchmetrics cuts them) of `confidence` against 0/1 `outcome` under weights."""
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    member = np.eye(n_bins, dtype=WEIGHT)[bins]  # (N, B)
    gap = (outcome.astype(np.float64) - confidence).astype(WEIGHT)

    def stat(w: np.ndarray) -> np.ndarray:
        return ratio(np.abs((w * gap) @ member).sum(1), w.sum(1))

    return stat


def weighted_counts(predicted: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """TP, FP, TN, FN of 0/1 decisions under weights."""
    pred, pos = predicted.astype(bool), y.astype(bool)
    masks = np.stack([pred & pos, pred & ~pos, ~pred & ~pos, ~pred & pos], 1).astype(WEIGHT)  # (N, 4)

    def counts(w: np.ndarray) -> dict[str, np.ndarray]:
        tp, fp, tn, fn = (w @ masks).T
        return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}

    return counts


def binary_figures(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV, accuracy, balanced accuracy and F1 from counts."""
    sens, spec = ratio(c["tp"], c["tp"] + c["fn"]), ratio(c["tn"], c["tn"] + c["fp"])
    return {
        "accuracy": ratio(c["tp"] + c["tn"], c["tp"] + c["tn"] + c["fp"] + c["fn"]),
        "sensitivity": sens, "specificity": spec,
        "ppv": ratio(c["tp"], c["tp"] + c["fp"]), "npv": ratio(c["tn"], c["tn"] + c["fn"]),
        "balanced_accuracy": (sens + spec) / 2,
        "f1": ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]),
    }


# ----------------------------------------------------------------------------- a split's intervals


def around(value: float, low: float, high: float, method: str) -> dict[str, float | str]:
    """An interval as reported. At a boundary (an AUROC near 0 or 1, a model that scores every
    image alike) resampling can move a figure one way only, and the percentile interval then
    misses the figure itself: it is stretched to reach it."""
    if math.isfinite(value) and math.isfinite(low) and math.isfinite(high):
        low, high = min(low, value), max(high, value)
    return {"value": value, "low": low, "high": high, "method": method}


# each proportion as (the counts of its successes, the counts of its trials)
PROPORTIONS = {"accuracy": (("tp", "tn"), ("tp", "tn", "fp", "fn")), "sensitivity": (("tp",), ("tp", "fn")),
               "specificity": (("tn",), ("tn", "fp")), "ppv": (("tp",), ("tp", "fp")), "npv": (("tn",), ("tn", "fn"))}


def _method(grouped: bool, resamples: int) -> str:
    return f"{'grouped ' if grouped else ''}stratified bootstrap, {resamples} resamples"


def _is_grouped(groups: np.ndarray | None, n: int) -> bool:
    """Whether some group holds more than one image (then images are not independent)."""
    return groups is not None and len(np.unique(groups.astype(str))) < n


def group_labels(named: list[str | None]) -> np.ndarray | None:
    """The group of each prediction for the bootstrap (an image without one is its own group),
    or None where no image has a group."""
    if all(g is None for g in named):
        return None
    return np.array([g if g is not None else f"image {k}" for k, g in enumerate(named)])


def binary_intervals(p1: np.ndarray, y: np.ndarray, *, threshold: float | np.ndarray, groups: np.ndarray | None = None,
                     resamples: int = RESAMPLES, seed: int = 0) -> dict[str, dict[str, float | str]]:
    """Each figure of a binary test split as {"value", "low", "high", "method"}: P(positive)
    `p1`, labels `y` (0/1), decided positive at p1 >= `threshold` (one, or one per prediction)."""
    p1, y = np.asarray(p1, np.float64), np.asarray(y).astype(int)
    grouped = _is_grouped(groups, len(y))
    counts = weighted_counts((p1 >= threshold).astype(int), y)
    ranks, ece = ranking(p1, y), weighted_ece(p1, y)
    ones = np.ones((1, len(y)), dtype=WEIGHT)
    unit = counts(ones)  # the split itself: every image once
    point = {k: int(round(float(v[0]))) for k, v in unit.items()}
    values = {k: float(v[0]) for k, v in {**binary_figures(unit), **ranks(ones), "ece": ece(ones)}.items()}
    out: dict[str, dict[str, float | str]] = {}
    if not grouped:  # images of one group are not independent trials: then these are bootstrapped too
        for name, (hits, trials) in PROPORTIONS.items():
            low, high = wilson(sum(point[k] for k in hits), sum(point[k] for k in trials))
            out[name] = {"value": values[name], "low": low, "high": high, "method": "Wilson"}

    def figures(w: np.ndarray) -> dict[str, np.ndarray]:
        found = {**ranks(w), "ece": ece(w)}
        found.update({k: v for k, v in binary_figures(counts(w)).items() if k not in out})
        return found

    method = _method(grouped, resamples)
    for name, (low, high) in bootstrap(figures, y, groups if grouped else None, resamples=resamples,
                                       seed=seed).items():
        out[name] = around(values[name], low, high, method)
    return {k: out[k] for k in ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "ppv", "npv",
                                "auroc", "average_precision", "ece")}


def multiclass_intervals(probs: np.ndarray, y: np.ndarray, *, groups: np.ndarray | None = None,
                         resamples: int = RESAMPLES, seed: int = 0) -> dict[str, dict[str, float | str]]:
    """Accuracy, balanced accuracy, macro AUROC (one-vs-rest over the classes present) and
    top-label ECE of a multi-class test split, each as {"value", "low", "high", "method"}."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y).astype(int)
    predicted = probs.argmax(1)
    right = (predicted == y).astype(WEIGHT)
    grouped = _is_grouped(groups, len(y))
    present = np.unique(y)
    aurocs = [ranking(probs[:, k], (y == k).astype(int), average_precision=False) for k in present]
    recall_masks = [(y == k).astype(WEIGHT) for k in present]

    def accuracy(w: np.ndarray) -> np.ndarray:
        return ratio(w @ right, w.sum(1))

    def balanced(w: np.ndarray) -> np.ndarray:
        return np.mean([ratio(w @ (right * m), w @ m) for m in recall_masks], axis=0)

    def auroc(w: np.ndarray) -> np.ndarray:
        return np.mean([a(w)["auroc"] for a in aurocs], axis=0) if len(present) > 1 else np.full(len(w), np.nan)

    ece = weighted_ece(probs.max(1), right)
    stats = {"accuracy": accuracy, "balanced_accuracy": balanced, "auroc": auroc, "ece": ece}
    ones = np.ones((1, len(y)), dtype=WEIGHT)
    method = _method(grouped, resamples)
    out: dict[str, dict[str, float | str]] = {}
    if not grouped:
        low, high = wilson(int(right.sum()), len(y))
        out["accuracy"] = {"value": float(accuracy(ones)[0]), "low": low, "high": high, "method": "Wilson"}

    def figures(w: np.ndarray) -> dict[str, np.ndarray]:
        return {k: stat(w) for k, stat in stats.items() if k not in out}

    for name, (low, high) in bootstrap(figures, y, groups if grouped else None, resamples=resamples,
                                       seed=seed).items():
        out[name] = around(float(stats[name](ones)[0]), low, high, method)
    return {k: out[k] for k in stats}


def split_intervals(task: str, probs: np.ndarray, y: np.ndarray, *, threshold: float | np.ndarray | None,
                    groups: np.ndarray | None = None, resamples: int = RESAMPLES,
                    seed: int = 0) -> dict[str, dict[str, float | str]]:
    """The intervals of a split's figures by task: binary (P(positive) is `probs[:, 1]`, decided
    at `threshold`) or multi-class (the argmax)."""
    if task == "binary":
        return binary_intervals(probs[:, 1], y, threshold=threshold, groups=groups,  # type: ignore[arg-type]
                                resamples=resamples, seed=seed)
    return multiclass_intervals(probs, y, groups=groups, resamples=resamples, seed=seed)
