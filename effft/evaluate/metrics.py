"""Evaluation metrics for a split, computed with torchmetrics on all gathered predictions.

`MetricSet` collects the logits and targets of one split (val or test) and turns them into a
flat `dict[str, float]`, with the logits divided by a temperature where one is given. The names are stable: the training module logs them as
`val/<name>` and `test/<name>`, and `metrics.json` holds them under "val" and "test".

Names by task (`<c>` is a class or label name as given in `classes`):

- multiclass: accuracy, top5_accuracy (only with more than 5 classes), balanced_accuracy
  (= macro recall), f1_macro, auroc (macro one-vs-rest), ece, ece_if_calibrated, nll,
  precision/<c>, recall/<c>
- binary: accuracy, balanced_accuracy, f1, sensitivity, specificity (all at `threshold`),
  auroc, average_precision, ece, ece_if_calibrated, threshold, nll
- multilabel: auroc (macro), map (macro average precision), f1_macro (at 0.5), nll, auroc/<c>, ap/<c>

Binary: the model gives 2 logits and the positive class is `classes[1]`; its probability is
softmax[:, 1]. A sample is predicted positive when that probability is >= the threshold.
Ranking metrics (auroc, average precision) are NaN where a split lacks positives or negatives
(for multilabel: per label; the macro value averages the labels where it is defined).
ECE uses 15 equal-width bins (binary: over P(positive); multiclass: over the top-1 confidence).
ece_if_calibrated is the ECE a perfectly calibrated model with the same probabilities would show
on the split on average (`calibrated_ece`): the part of the ECE that the split's size alone gives.
NLL is the mean negative log-likelihood of the targets (multi-label: mean binary cross-entropy),
unweighted and unsmoothed, unlike the training loss.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import CatMetric
from torchmetrics.functional import classification as F

from ..data.sources._common import Task

log = logging.getLogger(__name__)

ThresholdMethod = Literal["youden", "sensitivity", "fixed"]
DEFAULT_THRESHOLD = 0.5
ECE_BINS = 15

_MIN_NAMES = {"loss", "ece", "nll", "eer", "false_alarm_rate_k1", "false_alarm_rate_k5"}  # lower is better
# what an embedding run's validation gives (evaluate/verification.py; loss from train/losses.py)
EMBEDDING_NAMES = ["auroc", "eer", "accuracy", "rank1_k1", "rank5_k1", "rank1_k5", "rank5_k5", "threshold"]


class MetricSet(torch.nn.Module):
    """Collects one split's predictions and computes its metrics.

    A `torch.nn.Module`, so Lightning moves it to the model's device; the predictions are kept in
    torchmetrics `CatMetric`s, so under DDP `compute`, `probabilities` and `targets` see the
    predictions of all ranks. A set filled with predictions gathered already (every rank holds
    them all) is made with `gather=False`: gathering them again would repeat each one per rank.
    """

    def __init__(self, *, task: Task, num_classes: int, classes: list[str], gather: bool = True) -> None:
        super().__init__()
        if len(classes) != num_classes:
            raise ValueError(f"{num_classes=} but {len(classes)} class names: {classes}")
        if task == "binary" and num_classes != 2:
            raise ValueError(f"a binary task has 2 classes, got {num_classes}: {classes}")
        if task == "multiclass" and num_classes < 3:
            raise ValueError(f"a multiclass task has at least 3 classes, got {num_classes}")
        self.task: Task = task
        self.num_classes = num_classes
        self.classes = list(classes)
        # "disable": keep NaN logits in place (dropping them would misalign the rows)
        self._logits = CatMetric(nan_strategy="disable", sync_on_compute=gather)
        self._targets = CatMetric(nan_strategy="disable", sync_on_compute=gather)

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch: logits (B, C) and targets (B,) class indices or (B, L) 0/1 labels."""
        logits = logits.detach().float()
        if self.task == "binary" and (logits.ndim == 1 or logits.shape[-1] == 1):
            # a single-logit head: softmax of (0, l) gives P(positive) = sigmoid(l)
            logits = torch.stack([torch.zeros_like(logits.reshape(-1)), logits.reshape(-1)], dim=1)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} logits per sample, got {tuple(logits.shape)}")
        self._logits.update(logits)
        self._targets.update(target.detach())

    def reset(self) -> None:
        """Forget all predictions (Lightning does not reset a plain module for us)."""
        self._logits.reset()
        self._targets.reset()

    def logits(self) -> Tensor:
        """All logits (N, C) as collected."""
        logits = self._logits.compute()
        if isinstance(logits, list):  # nothing collected
            return torch.empty(0, self.num_classes)
        return logits.reshape(-1, self.num_classes)  # CatMetric gives one value as a 0-d tensor

    def probabilities(self, temperature: Tensor | float | None = None) -> Tensor:
        """All probabilities (N, C): softmax per class, or sigmoid per label for multilabel, of the
        logits divided by `temperature` (one value, or one per label; None: 1)."""
        return probabilities(scaled(self.logits(), temperature), self.task)

    def targets(self) -> Tensor:
        """All targets as int64: (N,) class indices, or (N, L) 0/1 for multilabel."""
        targets = self._targets.compute()
        if isinstance(targets, list):
            shape = (0, self.num_classes) if self.task == "multilabel" else (0,)
            return torch.empty(shape, dtype=torch.long)
        # CatMetric gives one value as a 0-d tensor: one image, or one image of one label
        return targets.long().reshape(-1, self.num_classes) if self.task == "multilabel" else targets.long().reshape(-1)

    def compute(self, *, threshold: float | None = None, temperature: Tensor | float | None = None) -> dict[str, float]:
        """The metrics of everything collected since the last `reset`.

        `threshold` is the binary operating point (default 0.5): choose it on val with
        `choose_threshold` and pass the same value for test. Other tasks take no threshold.
        `temperature` divides the logits first (see `effft.train.calibration`).
        """
        if threshold is not None and self.task != "binary":
            raise ValueError(f"a threshold applies to binary tasks only, not {self.task}")
        logits, targets = scaled(self.logits(), temperature), self.targets()
        if len(targets) == 0:
            raise RuntimeError("MetricSet.compute() before any update(): no predictions")
        probs = probabilities(logits, self.task)
        if self.task == "multiclass":
            result = _multiclass(probs, targets, self.classes)
        elif self.task == "binary":
            t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
            result = _binary(probs[:, 1].contiguous(), targets, t)
        else:
            result = _multilabel(probs, targets, self.classes)
        result["nll"] = negative_log_likelihood(logits, targets, self.task)
        return {name: result[name] for name in metric_names(task=self.task, classes=self.classes)}


def scaled(logits: Tensor, temperature: Tensor | float | None) -> Tensor:
    """Logits divided by a temperature (a number, or one per label), or as they are for None."""
    if temperature is None:
        return logits
    return logits / torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)


def negative_log_likelihood(logits: Tensor, targets: Tensor, task: str) -> float:
    """Mean NLL of the targets: cross-entropy of the softmax, or for multi-label the mean binary
    cross-entropy over items and labels. Unweighted and unsmoothed, whatever the training loss."""
    if len(targets) == 0:
        return math.nan
    if task == "multilabel":
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float()))
    return float(torch.nn.functional.cross_entropy(logits.float(), targets.long()))


def probabilities(logits: Tensor, task: str) -> Tensor:
    """(N, C) probabilities from logits: sigmoid per label for multilabel, softmax otherwise."""
    return logits.float().sigmoid() if task == "multilabel" else logits.float().softmax(dim=-1)


def predict(probs: Tensor, *, task: Task, threshold: float | None = None) -> Tensor:
    """Hard predictions from probabilities: class indices (N,), or 0/1 labels (N, L).

    Binary: class 1 where P(class 1) >= threshold; multilabel: each label whose probability is
    >= threshold (default 0.5 for both).
    """
    if task == "multiclass":
        return probs.argmax(dim=1)
    t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if task == "binary":
        return (probs[:, 1] >= t).long()
    return (probs >= t).long()


def choose_threshold(
    probs: Tensor,
    target: Tensor,
    *,
    method: ThresholdMethod = "youden",
    target_sensitivity: float | None = None,
    value: float | None = None,
) -> float:
    """A binary operating point chosen on (validation) predictions.

    `probs` is P(positive) (N,) or the (N, 2) probabilities. Methods:
    - "youden": the threshold maximising sensitivity + specificity - 1;
    - "sensitivity": the threshold with the fewest false positives whose sensitivity is at
      least `target_sensitivity`;
    - "fixed": `value`.
    Candidates are the distinct predicted probabilities; a sample counts as positive when its
    probability is >= the threshold. Without both classes in `target` the ROC is undefined and
    the result is 0.5 (logged as a warning), e.g. in Lightning's short sanity-check pass.
    """
    if method == "fixed":
        if value is None:
            raise ValueError("choose_threshold(method='fixed') needs value=")
        return float(value)
    if method not in ("youden", "sensitivity"):
        raise ValueError(f"unknown threshold method {method!r}: youden, sensitivity or fixed")
    if method == "sensitivity" and (target_sensitivity is None or not 0 < target_sensitivity <= 1):
        raise ValueError(f"method='sensitivity' needs 0 < target_sensitivity <= 1, got {target_sensitivity}")
    scores = (probs[:, 1] if probs.ndim == 2 else probs).contiguous()
    target = target.long()
    if target.min() == target.max():
        log.warning("threshold: the predictions hold one class only; using %s", DEFAULT_THRESHOLD)
        return DEFAULT_THRESHOLD
    fpr, tpr, thresholds = F.binary_roc(scores.float(), target)
    # torchmetrics prepends a (0, 0) point at threshold 1.0, which is no predicted probability
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if method == "youden":
        best = int(torch.argmax(tpr - fpr))  # first maximum: the highest such threshold
    else:
        # roc points go from high to low threshold, so fpr rises; among the points reaching the
        # target take the lowest fpr, and at equal fpr the highest sensitivity (lowest threshold)
        ok = torch.nonzero(tpr >= target_sensitivity - 1e-12).flatten()
        lowest_fpr = fpr[ok].min()
        best = int(ok[fpr[ok] == lowest_fpr].max())
    return float(thresholds[best])


def calibrated_ece(confidence: Tensor, *, n_bins: int = ECE_BINS, draws: int = 1000,
                   seed: int = 0) -> tuple[float, float]:
    """The ECE a perfectly calibrated model would show with these confidences on this many items:
    (the mean, the 90th percentile) over `draws` sets of outcomes, each outcome right with the
    probability its confidence claims. ECE is a sum of per-bin gaps that sampling alone opens, so
    on a small split even a calibrated model scores well above 0; an ECE below this mean says
    nothing more can be read from the split. `confidence`: (N,) the top-label probability (or, for
    the positive-class ECE of binary tasks, the probability of the positive class). Bins as
    torchmetrics cuts them: `n_bins` equal widths of [0, 1], right edges inclusive."""
    c = confidence.detach().double().cpu().reshape(-1)
    if c.numel() == 0:
        return math.nan, math.nan
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins = (torch.bucketize(c, edges, right=True) - 1).clamp(0, n_bins - 1)
    member = torch.nn.functional.one_hot(bins, n_bins).double()  # (N, B)
    gen = torch.Generator().manual_seed(seed)
    outcome = (torch.rand(draws, c.numel(), generator=gen, dtype=torch.float64) < c).double()  # (S, N)
    ece = ((outcome - c) @ member).abs().sum(1) / c.numel()
    return float(ece.mean()), float(torch.quantile(ece, 0.9))


def metric_direction(name: str) -> Literal["max", "min"]:
    """Whether a logged metric improves upwards or downwards ("val/loss" -> "min")."""
    parts = name.split("/")
    if parts[0] in ("train", "val", "test") and len(parts) > 1:
        parts = parts[1:]
    metric = parts[0]  # "recall/<class>" -> "recall": a class name says nothing of direction
    if metric in _MIN_NAMES or "loss" in metric or metric.endswith("error"):
        return "min"
    return "max"


def metric_names(*, task: Task, classes: list[str]) -> list[str]:
    """The names `MetricSet.compute` returns for this task and classes (to check `monitor`)."""
    per_class: list[str]
    if task == "embedding":
        return list(EMBEDDING_NAMES)
    if task == "multiclass":
        names = ["accuracy"] + (["top5_accuracy"] if len(classes) > 5 else [])
        names += ["balanced_accuracy", "f1_macro", "auroc", "ece", "nll"]
        per_class = ["precision", "recall"]
    elif task == "binary":
        names = ["accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"]
        names += ["auroc", "average_precision", "ece", "threshold", "nll"]
        per_class = []
    else:
        names, per_class = ["auroc", "map", "f1_macro", "nll"], ["auroc", "ap"]
    return names + [f"{m}/{c}" for m in per_class for c in classes]


def _multiclass(probs: Tensor, targets: Tensor, classes: list[str]) -> dict[str, float]:
    """Classes absent from `targets` (a small val split, a short run) have no recall and no ROC:
    their recall is NaN and they are left out of balanced accuracy and the macro AUROC."""
    c = len(classes)
    present = (torch.bincount(targets, minlength=c) > 0).cpu()
    recall = F.multiclass_recall(probs, targets, c, average=None).float().cpu()
    recall[~present] = math.nan
    if present.all():
        auroc = float(F.multiclass_auroc(probs, targets, c, average="macro"))
    elif int(present.sum()) > 1:  # one-vs-rest, over the classes with positives only
        idx = torch.nonzero(present).flatten().tolist()
        auroc = float(torch.stack([F.binary_auroc(probs[:, k], (targets == k).long()) for k in idx]).mean())
    else:
        auroc = math.nan
    result = {"accuracy": float(F.multiclass_accuracy(probs, targets, c, average="micro"))}
    if c > 5:
        result["top5_accuracy"] = float(F.multiclass_accuracy(probs, targets, c, average="micro", top_k=5))
    result["balanced_accuracy"] = float(recall[present].mean())
    result["f1_macro"] = float(F.multiclass_f1_score(probs, targets, c, average="macro"))
    result["auroc"] = auroc
    result["ece"] = float(F.multiclass_calibration_error(probs, targets, c, n_bins=ECE_BINS))
    result["ece_if_calibrated"] = calibrated_ece(probs.max(dim=1).values)[0]
    precision = F.multiclass_precision(probs, targets, c, average=None)
    result.update({f"precision/{name}": float(v) for name, v in zip(classes, precision)})
    result.update({f"recall/{name}": float(v) for name, v in zip(classes, recall)})
    return result


def _binary(p1: Tensor, targets: Tensor, threshold: float) -> dict[str, float]:
    hard = (p1 >= threshold).long()  # our rule (torchmetrics itself thresholds with >)
    sensitivity = float(F.binary_recall(hard, targets))
    specificity = float(F.binary_specificity(hard, targets))
    both = bool(targets.min() != targets.max())
    nan = math.nan
    return {
        "accuracy": float(F.binary_accuracy(hard, targets)),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "f1": float(F.binary_f1_score(hard, targets)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "auroc": float(F.binary_auroc(p1, targets)) if both else nan,
        "average_precision": float(F.binary_average_precision(p1, targets)) if both else nan,
        "ece": float(F.binary_calibration_error(p1, targets, n_bins=ECE_BINS)),
        "ece_if_calibrated": calibrated_ece(p1)[0],
        "threshold": threshold,
    }


def _multilabel(probs: Tensor, targets: Tensor, classes: list[str]) -> dict[str, float]:
    n = len(classes)
    hard = (probs >= DEFAULT_THRESHOLD).long()
    result = {"auroc": math.nan, "map": math.nan}
    result["f1_macro"] = float(F.multilabel_f1_score(hard, targets, n, average="macro"))
    positives = targets.sum(dim=0)
    defined = (positives > 0) & (positives < len(targets))  # ranking needs both 0s and 1s
    auroc = torch.full((n,), math.nan)
    ap = torch.full((n,), math.nan)
    if defined.any():
        idx = torch.nonzero(defined).flatten()
        p, y, k = probs[:, idx], targets[:, idx], len(idx)
        at = idx.cpu()  # the per-label results live on the CPU
        # label by label: torchmetrics' multilabel functions need at least two labels
        auroc[at] = torch.stack([F.binary_auroc(p[:, j], y[:, j]) for j in range(k)]).float().cpu()
        ap[at] = torch.stack([F.binary_average_precision(p[:, j], y[:, j]) for j in range(k)]).float().cpu()
        result["auroc"] = float(auroc[at].mean())
        result["map"] = float(ap[at].mean())
    result.update({f"auroc/{name}": float(v) for name, v in zip(classes, auroc)})
    result.update({f"ap/{name}": float(v) for name, v in zip(classes, ap)})
    return result
