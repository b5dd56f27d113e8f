"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017).

Logits are divided by a temperature T > 0 chosen to minimise the negative log-likelihood on the
validation split: one T for softmax outputs (binary and multi-class), one per label for
multi-label outputs (each label is its own sigmoid). Dividing by T never changes which class
scores highest, so accuracy and AUROC stay as they were; only the probabilities move towards
the frequencies they claim. The split the temperature is fitted on must not be the split whose
figures are reported.

A small validation split says little about the temperature, and one with no error at all says
"sharpen without end" (its NLL falls towards 0 as T does). So the NLL is minimised with a prior
that pulls log T towards 0 with the weight of PRIOR_ITEMS items: on thousands of items the data
decide alone; on a few dozen the temperature moves only as far as they clearly ask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BOUNDS = (0.05, 20.0)  # temperatures outside this are a sign of something broken, not calibration
PRIOR_ITEMS = 20  # the weight of the prior on log T, in items of the split (see above)


def _nll(logits: Tensor, targets: Tensor, task: str) -> float:
    if task == "multilabel":
        return float(F.binary_cross_entropy_with_logits(logits, targets.float()))
    return float(F.cross_entropy(logits, targets.long()))


def _best_temperature(logits: Tensor, targets: Tensor, task: str) -> float:
    from scipy.optimize import minimize_scalar

    weight = PRIOR_ITEMS / max(1, len(targets))

    def loss(log_t: float) -> float:
        return _nll(logits / math.exp(log_t), targets, task) + weight * log_t ** 2

    found = minimize_scalar(loss, bounds=tuple(math.log(b) for b in BOUNDS), method="bounded",
                            options={"xatol": 1e-4})
    best = math.exp(float(found.x))
    # the prior is 0 at T = 1: the split's NLL is never made worse than without scaling
    return best if loss(math.log(best)) < loss(0.0) else 1.0


def fit_temperature(logits: Tensor, targets: Tensor, *, task: str) -> Tensor:
    """The temperature(s) that minimise the NLL of `logits` (N, C) against `targets`: a 0-d
    tensor for binary and multi-class, one per label (C,) for multi-label. 1 where the split
    cannot tell (no item, or for a label only one class)."""
    logits = logits.detach().double().cpu()
    targets = targets.detach().cpu()
    if task != "multilabel":
        if len(targets) == 0:
            return torch.tensor(1.0)
        return torch.tensor(_best_temperature(logits, targets, task))
    out = torch.ones(logits.shape[1], dtype=torch.float64)
    for j in range(logits.shape[1]):
        y = targets[:, j]
        if len(y) and 0 < int(y.sum()) < len(y):
            out[j] = _best_temperature(logits[:, j:j + 1], y[:, None], task)
    return out.float()


def nll(logits: Tensor, targets: Tensor, *, task: str) -> float:
    """Mean negative log-likelihood (multi-label: mean binary cross-entropy over labels)."""
    return _nll(logits.detach().double().cpu(), targets.detach().cpu(), task)
