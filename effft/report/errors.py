"""The report's grid of the most confident errors, each with its Grad-CAM map (`errors.png`)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.decode import BadImageError
from ..data.transforms import apply
from ..errors import EffftError
from ..evaluate.metrics import probabilities
from .figures import save_figure
from .gradcam import Explanation, explain_indexed, figure_cell

log = logging.getLogger(__name__)


@dataclass
class _Error:
    path: Path
    true: str
    predicted: str
    explained: int  # the class whose map is drawn
    prob: float  # its probability in the CSV
    confidence: float  # in the wrong decision: the order of the grid


def _read_errors(classes: list[str], task: str, csv_path: Path) -> list[_Error]:
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise EffftError(f"cannot read {csv_path}: {exc.strerror or exc}") from None
    wanted = ["path", "target", "predicted"] + [f"prob_{c}" for c in classes]
    missing = [c for c in wanted if rows and c not in rows[0]]
    if missing:
        raise EffftError(f"{csv_path} lacks the column(s) {', '.join(missing)}: give a report/predictions.csv "
                         "of this run written with image paths")
    errors = []
    for row in rows:
        if row["target"] == row["predicted"]:
            continue
        p = np.array([float(row[f"prob_{c}"]) for c in classes])
        if task == "multilabel":
            truth = set(filter(None, row["target"].split(";")))
            said = set(filter(None, row["predicted"].split(";")))
            if truth == said:
                continue
            # the label decided most confidently the wrong way: p for a false positive, 1 - p for a miss
            wrong = [(p[i] if c in said else 1 - p[i], i) for i, c in enumerate(classes) if (c in said) != (c in truth)]
            confidence, explained = max(wrong)
        else:
            explained = classes.index(row["predicted"]) if row["predicted"] in classes else int(p.argmax())
            confidence = float(p[explained])
        errors.append(_Error(Path(row["path"]), row["target"], row["predicted"], explained, float(p[explained]),
                             float(confidence)))
    return errors


def error_grid(model: torch.nn.Module, *, classes: list[str], task: str, read: Callable[[Path], np.ndarray],
               pipeline: Any, channels: int, predictions_csv: Path, out_png: Path, k: int = 8,
               batch_size: int = 16) -> Path | None:
    """A PNG grid of Grad-CAM overlays of the `k` most confident wrong predictions, or None.

    `model` (in eval mode) made the predictions; `read(path)` gives an image as the run's
    adapter read it (an HWC uint8 array; DICOM windowed, faces cropped) and `pipeline` the run's
    eval pipeline, ending in tensors of `channels` channels.

    `predictions_csv` is a report's `predictions.csv` (path, target, predicted, prob_<class>, as
    `effft.report.figures.write_report` writes it with paths). Each cell is captioned
    "true / predicted (p)", p the probability of the class drawn: the predicted class; for
    multilabel the label decided most confidently the wrong way (named in the caption). Unreadable files are skipped
    with a warning and the next error taken. Returns None (and says so) when nothing was wrong.
    """
    from matplotlib.figure import Figure

    if k < 1:
        raise EffftError(f"k must be at least 1, got {k}")
    errors = sorted(_read_errors(classes, task, Path(predictions_csv)), key=lambda e: -e.confidence)
    if not errors:
        log.info("no wrong predictions in %s: no error grid written", predictions_csv)
        return None
    chosen, tensors, bad = [], [], []
    for e in errors:
        if len(chosen) == k:
            break
        try:
            tensors.append(apply(pipeline, read(e.path), channels))
            chosen.append(e)
        except BadImageError as exc:
            bad.append(f"{e.path}: {exc.reason}")
    if bad:
        log.warning("error grid: %d images could not be read and were skipped: %s", len(bad), "; ".join(bad[:10]))
    if not chosen:
        raise EffftError(f"none of the {len(errors)} wrongly predicted images in {predictions_csv} could be read")
    explained: list[Explanation] = []
    for s in range(0, len(chosen), batch_size):
        batch = torch.stack(tensors[s:s + batch_size])
        with torch.no_grad():
            probs = probabilities(model(batch), task)
        index = torch.tensor([e.explained for e in chosen[s:s + batch_size]])
        explained += explain_indexed(model, pipeline, batch, [e.path for e in chosen[s:s + batch_size]], index, probs)
    ncols = min(4, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.9 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, err, e in zip(axes, chosen, explained):
        label = f"{classes[err.explained]} " if task == "multilabel" else ""
        figure_cell(ax, e, f"{err.true or '-'} / {err.predicted or '-'} ({label}p={err.prob:.2f})", fontsize=8)
    for ax in axes[len(chosen):]:
        ax.set_axis_off()
    fig.suptitle(f"most confident errors: true / predicted (p), {len(chosen)} of {len(errors)}")
    save_figure(fig, Path(out_png))
    return Path(out_png)
