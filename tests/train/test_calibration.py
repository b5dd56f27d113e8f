"""Temperature scaling: fitted on one split's logits, it lowers the NLL of an over-confident
model, keeps every decision, and agrees with a brute-force search of the same objective."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from effft.train.calibration import PRIOR_ITEMS, fit_temperature, nll


def over_confident(n: int, classes: int, *, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a calibrated model (targets drawn from its own softmax), multiplied by `scale`."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 1.5
    targets = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    return logits * scale, targets


def test_an_over_confident_model_gets_its_temperature_back():
    logits, targets = over_confident(4000, 5, scale=4.0, seed=0)
    t = fit_temperature(logits, targets, task="multiclass")
    assert t.ndim == 0 and 3.4 < float(t) < 4.6  # the scale that was put on
    assert nll(logits / t, targets, task="multiclass") < 0.8 * nll(logits, targets, task="multiclass")
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))
    # the same objective (the NLL and the prior on log T) searched on a fine grid, outside effft
    grid = np.exp(np.linspace(np.log(0.5), np.log(10), 2000))
    losses = [float(F.cross_entropy(logits.double() / g, targets)) + PRIOR_ITEMS / len(targets) * np.log(g) ** 2
              for g in grid]
    assert abs(float(t) - grid[int(np.argmin(losses))]) < 0.02


def test_a_calibrated_model_is_left_near_one_and_never_made_worse():
    logits, targets = over_confident(4000, 3, scale=1.0, seed=1)
    t = float(fit_temperature(logits, targets, task="binary" if logits.shape[1] == 2 else "multiclass"))
    assert 0.9 < t < 1.1
    tiny_logits, tiny_targets = over_confident(3, 3, scale=1.0, seed=2)
    t = fit_temperature(tiny_logits, tiny_targets, task="multiclass")
    assert nll(tiny_logits / t, tiny_targets, task="multiclass") <= nll(tiny_logits, tiny_targets, task="multiclass")


def test_multilabel_gets_one_temperature_per_label():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3000, 3, generator=g)
    targets = torch.bernoulli(base.sigmoid(), generator=g)
    targets[:, 2] = 1  # a label with positives only: nothing to fit, left at 1
    logits = base * torch.tensor([3.0, 0.5, 2.0])
    t = fit_temperature(logits, targets, task="multilabel")
    assert t.shape == (3,)
    assert 2.5 < float(t[0]) < 3.5 and 0.4 < float(t[1]) < 0.6 and float(t[2]) == 1.0
    assert nll(logits / t, targets, task="multilabel") < nll(logits, targets, task="multilabel")


def test_a_split_without_errors_does_not_sharpen_without_end():
    # every item right: the NLL alone falls towards 0 as T does; the prior keeps T moderate
    g = torch.Generator().manual_seed(4)
    targets = torch.arange(60) % 20
    logits = torch.randn(60, 20, generator=g)
    logits[torch.arange(60), targets] += 6.0
    assert torch.equal(logits.argmax(1), targets)
    t = float(fit_temperature(logits, targets, task="multiclass"))
    assert 0.3 < t < 1.0
    # the same logits' objective without the prior would take the lowest temperature allowed
    grid = np.exp(np.linspace(np.log(0.05), 0, 200))
    losses = [float(F.cross_entropy(logits.double() / g, targets)) for g in grid]
    assert int(np.argmin(losses)) == 0


def test_a_few_items_move_the_temperature_less_than_many_of_the_same_kind():
    logits, targets = over_confident(4000, 5, scale=4.0, seed=5)
    many = float(fit_temperature(logits, targets, task="multiclass"))
    few = float(fit_temperature(logits[:30], targets[:30], task="multiclass"))
    assert 1.0 < few < many
