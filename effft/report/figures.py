"""One split's report folder: figures, per-class table and predictions.

`write_report` writes it from the split's gathered probabilities and targets
(`MetricSet.probabilities()` / `.targets()`). Matplotlib is imported inside the plotting
functions (it is slow to import) and used through `Figure` directly, so no global backend is
switched.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..data.sources._common import Task
from ..evaluate.metrics import DEFAULT_THRESHOLD, predict
from ..evaluate.operating_points import operating_points
from ..paths import atomic_write

log = logging.getLogger(__name__)

MAX_ROC_CURVES = 20  # more curves in one plot cannot be told apart
MAX_ANNOTATED_CLASSES = 30  # beyond this the numbers in the confusion matrix cells overlap


def write_report(
    report_dir: Path,
    *,
    task: Task,
    classes: list[str],
    probs: Tensor,
    targets: Tensor,
    threshold: float | None = None,
    paths: list[str] | None = None,
    title: str = "",
    operating: dict[str, float] | None = None,
) -> None:
    """Write `confusion_matrix.png`, `roc.png`, `reliability.png`, `per_class.csv` and `predictions.csv`,
    and for binary tasks `pr.png` (precision-recall). `operating` ({name: threshold}, binary):
    the operating points marked on ROC and PR (default: the threshold alone).

    `probs` (N, C) and `targets` are as `MetricSet.probabilities()` and `.targets()` give them;
    `threshold` is the binary operating point (default 0.5), `paths` the N image paths in the
    same order, `title` a heading for the figures (e.g. "test"). `roc.png` is left out where no
    class has both positives and negatives.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    p = probs.detach().float().cpu().numpy()
    y = targets.detach().long().cpu().numpy()
    if paths is not None and len(paths) != len(y):
        raise ValueError(f"{len(paths)} paths for {len(y)} predictions")
    pred = predict(probs.detach().float().cpu(), task=task, threshold=threshold).numpy()
    _write_csv(report_dir / "per_class.csv", *_per_class_rows(task, classes, p, y, pred))
    _write_csv(report_dir / "predictions.csv", *_prediction_rows(task, classes, p, y, pred, paths))
    _plot_confusion(report_dir / "confusion_matrix.png", task, classes, y, pred, title, threshold)
    points = (operating or {"threshold": DEFAULT_THRESHOLD if threshold is None else threshold}) \
        if task == "binary" else {}
    _plot_roc(report_dir / "roc.png", task, classes, p, y, points, title)
    (report_dir / "pr.png").unlink(missing_ok=True)
    if task == "binary":
        _plot_pr(report_dir / "pr.png", classes, p, y, points, title)
    _plot_reliability(report_dir / "reliability.png", task, p, y, title)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def _onehot(task: Task, y: np.ndarray, n: int) -> np.ndarray:
    return y if task == "multilabel" else np.eye(n, dtype=np.int64)[y]


def _per_class_rows(task, classes, p, y, pred) -> tuple[list[str], list[list]]:
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    n = len(classes)
    labels = list(range(n))
    if task == "multilabel":
        prec, rec, f1, _ = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    else:
        prec, rec, f1, _ = precision_recall_fscore_support(
            y, pred, labels=labels, average=None, zero_division=0
        )
    truth = _onehot(task, y, n)  # one-vs-rest view of every class
    rows = []
    for c, name in enumerate(classes):
        support = int(truth[:, c].sum())
        ranked = 0 < support < len(truth)
        auroc = roc_auc_score(truth[:, c], p[:, c]) if ranked else ""
        ap = average_precision_score(truth[:, c], p[:, c]) if ranked else ""
        rows.append([name, support, *(_num(v) for v in (prec[c], rec[c], f1[c], auroc, ap))])
    return ["class", "support", "precision", "recall", "f1", "auroc", "average_precision"], rows


def _num(v) -> str:
    return "" if v == "" else f"{float(v):.6g}"


def _prediction_rows(task, classes, p, y, pred, paths) -> tuple[list[str], list[list]]:
    def names(row) -> str:
        return ";".join(classes[i] for i in np.flatnonzero(row))

    header = (["path"] if paths is not None else []) + ["target", "predicted"]
    header += [f"prob_{c}" for c in classes]
    rows = []
    for i in range(len(y)):
        if task == "multilabel":
            cells = [names(y[i]), names(pred[i])]
        else:
            cells = [classes[y[i]], classes[pred[i]]]
        # 9 significant digits: a float32 probability reads back exactly (compared with the threshold)
        rows.append(([paths[i]] if paths is not None else []) + cells + [f"{v:.9g}" for v in p[i]])
    return header, rows


def save_figure(fig, path: Path) -> None:
    """A matplotlib Figure as a PNG, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _plot_confusion(path: Path, task, classes, y, pred, title: str, threshold) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix

    if task == "multilabel":
        mats = multilabel_confusion_matrix(y, pred)
        ncols = min(len(classes), 5)
        nrows = math.ceil(len(classes) / ncols)
        fig = Figure(figsize=(2.6 * ncols, 2.6 * nrows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, name, mat in zip(axes, classes, mats):
            _draw_matrix(ax, mat, ["0", "1"], annotate=True)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("predicted", fontsize=8)
            ax.set_ylabel("true", fontsize=8)
        for ax in axes[len(classes):]:
            ax.set_axis_off()
    else:
        n = len(classes)
        size = max(4.0, 0.45 * n + 2)
        fig = Figure(figsize=(size, size), layout="constrained")
        ax = fig.subplots()
        mat = confusion_matrix(y, pred, labels=list(range(n)))
        _draw_matrix(ax, mat, classes, annotate=n <= MAX_ANNOTATED_CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    at = f" (threshold {threshold:.3g})" if task == "binary" and threshold is not None else ""
    fig.suptitle(f"confusion matrix {title}{at}".strip())
    save_figure(fig, path)


def _draw_matrix(ax, mat: np.ndarray, labels: list[str], *, annotate: bool) -> None:
    rows = mat.sum(axis=1, keepdims=True)
    norm = np.divide(mat, rows, out=np.zeros(mat.shape, dtype=float), where=rows > 0)
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45 if len(labels) > 3 else 0, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    if annotate:
        for (i, j), count in np.ndenumerate(mat):
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, f"{count}\n{100 * norm[i, j]:.0f}%", ha="center", va="center",
                    color=colour, fontsize=7)


MARKERS = "osD^v"


def _plot_roc(path: Path, task, classes, p, y, points: dict[str, float], title: str) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    truth = _onehot(task, y, len(classes))
    # binary: one curve for the positive class; otherwise one-vs-rest per class or label
    wanted = [1] if task == "binary" else list(range(len(classes)))
    drawable = [c for c in wanted if 0 < truth[:, c].sum() < len(truth)]
    if not drawable:
        log.warning("no ROC curve for %s: no class has both positives and negatives", path)
        return
    shown = drawable[:MAX_ROC_CURVES]
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    for c in shown:
        fpr, tpr, _ = roc_curve(truth[:, c], p[:, c])
        auc = roc_auc_score(truth[:, c], p[:, c])
        ax.plot(fpr, tpr, lw=1.2, label=f"{classes[c]} (AUROC {auc:.3f})")
    for k, row in enumerate(operating_points(p[:, 1], y, points) if points else []):
        ax.plot([1 - row["specificity"]], [row["sensitivity"]], MARKERS[k % len(MARKERS)], ms=6,
                label=f"{row['operating_point']}: {row['threshold']:.3g}")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    note = f" ({len(shown)} of {len(drawable)} classes)" if len(shown) < len(drawable) else ""
    ax.set_title(f"ROC {title}{note}".strip())
    ax.legend(loc="lower right", fontsize=7)
    save_figure(fig, path)


def _plot_pr(path: Path, classes, p, y, points: dict[str, float], title: str) -> None:
    """Precision against recall (sensitivity) for the positive class, the operating points marked."""
    from matplotlib.figure import Figure
    from sklearn.metrics import average_precision_score, precision_recall_curve

    positive = (y == 1).astype(int)
    if not 0 < positive.sum() < len(positive):
        log.warning("no precision-recall curve for %s: the split lacks positives or negatives", path)
        return
    precision, recall, _ = precision_recall_curve(positive, p[:, 1])
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.step(recall, precision, where="post", lw=1.2,
            label=f"{classes[1]} (AP {average_precision_score(positive, p[:, 1]):.3f})")
    ax.axhline(positive.mean(), ls="--", lw=0.8, color="grey", label="prevalence")
    for k, row in enumerate(operating_points(p[:, 1], y, points)):
        if not math.isnan(row["ppv"]):  # nothing decided positive: no precision
            ax.plot([row["sensitivity"]], [row["ppv"]], MARKERS[k % len(MARKERS)], ms=6,
                    label=f"{row['operating_point']}: {row['threshold']:.3g}")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall {title}".strip())
    ax.legend(loc="lower left", fontsize=7)
    save_figure(fig, path)


RELIABILITY_BINS = 15  # as the ECE of the metrics


def calibration_points(task: Task, p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probability said, outcome 0/1) pairs a reliability diagram and the ECE are made of: binary,
    P(positive) and whether the item is positive; multi-class, the top probability and whether
    that class is right; multi-label, every label's probability and whether it is present."""
    if task == "binary":
        return p[:, 1], (y == 1).astype(float)
    if task == "multilabel":
        return p.ravel(), y.ravel().astype(float)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(float)


def reliability_bins(said: np.ndarray, outcome: np.ndarray, bins: int = RELIABILITY_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-width bin of `said` in 0..1: mean probability said, observed frequency,
    count."""
    index = np.clip((said * bins).astype(int), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    filled = counts > 0
    mean_said = np.bincount(index, weights=said, minlength=bins)[filled] / counts[filled]
    frequency = np.bincount(index, weights=outcome, minlength=bins)[filled] / counts[filled]
    return mean_said, frequency, counts[filled]


def _plot_reliability(path: Path, task: Task, p: np.ndarray, y: np.ndarray, title: str) -> None:
    from matplotlib.figure import Figure

    said, outcome = calibration_points(task, p, y)
    mean_said, frequency, counts = reliability_bins(said, outcome)
    ece = float(np.sum(counts * np.abs(frequency - mean_said)) / max(1, counts.sum()))
    what = {"binary": "P(positive)", "multilabel": "P(label), all labels"}.get(task, "top-class probability")
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfectly calibrated")
    ax.scatter(mean_said, frequency, s=20 + 180 * counts / counts.max(), color="tab:blue", alpha=0.7,
               label="bins (area: items)")
    ax.plot(mean_said, frequency, lw=1, color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"{what} said by the model")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"reliability {title} (ECE {ece:.3f}, {len(said)} probabilities)".strip())
    ax.legend(loc="upper left", fontsize=7)
    save_figure(fig, path)


def forest_plot(path: Path, rows: list[dict[str, Any]], *, task: str, overall: dict[str, Any] | None,
                title: str = "") -> None:
    """The headline figure of each subgroup with its interval, one line per subgroup, the
    whole split's value as a dashed line; flagged subgroups in grey."""
    from matplotlib.figure import Figure

    from ..evaluate.subgroups import HEADLINE

    metric = HEADLINE[task]
    shown = [r for r in rows if r["metric"] == metric]
    if not shown:
        return
    fig = Figure(figsize=(6.5, 1.2 + 0.35 * len(shown)), layout="constrained")
    ax = fig.subplots()
    for k, r in enumerate(reversed(shown)):
        value, low, high = (r[key] if r[key] is not None else math.nan for key in ("value", "low", "high"))
        colour = "grey" if r["warning"] else "black"
        if not math.isnan(value):
            ax.errorbar([value], [k], xerr=[[max(0.0, value - low)], [max(0.0, high - value)]]
                        if not (math.isnan(low) or math.isnan(high)) else None, fmt="s", color=colour, capsize=3)
    labels = [f"{r['column']} = {r['subgroup']} (n={r['n']})" + (" *" if r["warning"] else "") for r in reversed(shown)]
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    if overall is not None and overall.get("value") is not None:
        ax.axvline(overall["value"], ls="--", lw=0.8, color="crimson", label=f"whole split {overall['value']:.3f}")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xlabel(f"{metric} (95% interval){'; * few images or one class only' if any(r['warning'] for r in shown) else ''}")
    ax.set_title(f"subgroups {title}".strip())
    save_figure(fig, path)


# ---------------------------------------------------------------- face (identity) embeddings


def plot_pair_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str) -> None:
    """Verification ROC: true accept rate against false accept rate (log scale) of each
    approach's pair scores ({name: (scores, same person)})."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    floor = 1.0
    for name, (score, same) in curves.items():
        fpr, tpr, _ = roc_curve(same, score)
        floor = min(floor, 1.0 / max(1, int((~same).sum())))
        ax.plot(np.maximum(fpr, floor), tpr, lw=1.2, label=f"{name} (AUROC {roc_auc_score(same, score):.3f})")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_xlabel("false accept rate (impostor pairs accepted)")
    ax.set_ylabel("true accept rate (genuine pairs accepted)")
    ax.set_title(f"verification ROC {title}".strip())
    ax.legend(loc="lower right", fontsize=7)
    save_figure(fig, path)


def plot_scores(path: Path, genuine: np.ndarray, impostor: np.ndarray, *, threshold: float | None,
                title: str) -> None:
    """Histograms of the similarities of genuine and impostor pairs, each as a density, and
    the threshold chosen on val."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(min(genuine.min(initial=1), impostor.min(initial=1)), 1, 50)
    ax.hist(impostor, bins=bins, density=True, alpha=0.55, label=f"impostor pairs ({len(impostor)})")
    ax.hist(genuine, bins=bins, density=True, alpha=0.55, label=f"genuine pairs ({len(genuine)})")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold from val: {threshold:.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(f"pair similarities {title}".strip())
    ax.legend(fontsize=7)
    save_figure(fig, path)
