"""Confidence intervals: Wilson against the hand-computed formula, the weighted figures against
scikit-learn with sample weights, and the bootstrap's behaviour (coverage of the point, width
with n and with correlated groups, seeding)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from effft.evaluate.intervals import (
    binary_intervals,
    multiclass_intervals,
    ranking,
    resample_weights,
    weighted_ece,
    wilson,
)


def test_wilson_matches_the_formula_for_45_of_50():
    z, n, p = 1.959963984540054, 50, 45 / 50
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = wilson(45, 50)
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.7864, 0.9565)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson(0, 0))


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_ranking_figures_match_scikit_learn_with_sample_weights(ties):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    scores = rng.normal(y * 0.8, 1.0)
    if ties:
        scores = np.round(scores, 1)  # many equal scores
    w = rng.integers(0, 4, (5, 300)).astype(np.float32)
    got = ranking(scores, y)(w)
    for b in range(5):
        assert got["auroc"][b] == pytest.approx(skm.roc_auc_score(y, scores, sample_weight=w[b]), abs=1e-6)
        assert got["average_precision"][b] == pytest.approx(
            skm.average_precision_score(y, scores, sample_weight=w[b]), abs=1e-6)


def test_weighted_ece_with_unit_weights_is_torchmetrics_ece():
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    rng = np.random.default_rng(1)
    p = rng.random(200)
    y = (rng.random(200) < p ** 1.5).astype(int)
    want = float(binary_calibration_error(torch.tensor(p), torch.tensor(y), n_bins=15))
    assert weighted_ece(p, y)(np.ones((1, 200), np.float32))[0] == pytest.approx(want, abs=1e-5)


def test_stratified_resamples_keep_each_class_at_its_size():
    y = np.array([0] * 30 + [1] * 10)
    for w in resample_weights(y, None, resamples=300, seed=0):
        assert (w[:, y == 0].sum(1) == 30).all() and (w[:, y == 1].sum(1) == 10).all()


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return 1 / (1 + np.exp(-rng.normal(1.5 * (2 * y - 1), 1.5))), y


def test_the_auroc_interval_holds_the_point_and_narrows_as_n_grows():
    widths = []
    for n in (100, 1600):
        p, y = _scores(n, seed=n)
        got = binary_intervals(p, y, threshold=0.5, resamples=1000)["auroc"]
        assert got["value"] == pytest.approx(skm.roc_auc_score(y, p))
        assert got["low"] < got["value"] < got["high"]
        widths.append(got["high"] - got["low"])
    assert widths[1] < widths[0] / 2.5  # about 1 / sqrt(16) as wide


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    p, y = _scores(200, seed=3)
    a = binary_intervals(p, y, threshold=0.5, resamples=500, seed=7)
    assert a == binary_intervals(p, y, threshold=0.5, resamples=500, seed=7)
    assert a["auroc"] != binary_intervals(p, y, threshold=0.5, resamples=500, seed=8)["auroc"]


def test_proportions_are_wilson_and_the_rest_bootstrapped():
    p, y = _scores(120, seed=4)
    got = binary_intervals(p, y, threshold=0.5, resamples=200)
    predicted = p >= 0.5
    tp = int((predicted & (y == 1)).sum())
    assert got["sensitivity"]["method"] == "Wilson"
    assert (got["sensitivity"]["low"], got["sensitivity"]["high"]) == wilson(tp, int(y.sum()))
    assert got["sensitivity"]["value"] == pytest.approx(skm.recall_score(y, predicted))
    assert got["ppv"]["value"] == pytest.approx(skm.precision_score(y, predicted))
    assert got["f1"]["value"] == pytest.approx(skm.f1_score(y, predicted))
    assert got["average_precision"]["value"] == pytest.approx(skm.average_precision_score(y, p))
    assert "bootstrap" in got["auroc"]["method"]


def test_the_grouped_bootstrap_is_wider_on_strongly_correlated_groups():
    # 40 patients with 10 images each; a patient's images score almost alike
    rng = np.random.default_rng(5)
    patient_y = rng.integers(0, 2, 40)
    patient_score = rng.normal(patient_y * 1.0, 1.0)
    y = np.repeat(patient_y, 10)
    scores = np.repeat(patient_score, 10) + rng.normal(0, 0.05, 400)
    groups = np.repeat(np.arange(40), 10)
    alone = binary_intervals(scores, y, threshold=0.5, resamples=1000)
    grouped = binary_intervals(scores, y, threshold=0.5, resamples=1000, groups=groups)
    assert grouped["auroc"]["value"] == alone["auroc"]["value"]
    assert "grouped" in grouped["auroc"]["method"] and "grouped" in grouped["sensitivity"]["method"]
    for name in ("auroc", "sensitivity"):
        width = lambda r: r[name]["high"] - r[name]["low"]  # noqa: E731
        assert width(grouped) > 2 * width(alone), name


def test_multiclass_intervals_hold_their_points():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4))
    logits[np.arange(400), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = multiclass_intervals(probs, y, resamples=500)
    assert got["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, probs.argmax(1)))
    assert got["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(y, probs.argmax(1)))
    assert got["auroc"]["value"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    for name, r in got.items():
        assert r["low"] <= r["value"] <= r["high"], name
