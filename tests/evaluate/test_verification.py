"""Verification and identification figures of embeddings (evaluate/verification.py), checked
against scikit-learn on the same scores and against hand-made galleries."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from effft.evaluate import verification as v


def people_embeddings(people: int, photos: int, *, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, 16))
    y = np.repeat(np.arange(people), photos)
    e = centres[y] + rng.normal(scale=spread, size=(len(y), 16))
    return e / np.linalg.norm(e, axis=1, keepdims=True), y


@pytest.mark.parametrize("spread", [0.6, 1.5])
def test_verification_figures_equal_scikit_learn_on_the_same_scores(spread):
    e, y = people_embeddings(20, 10, spread=spread)
    pairs = v.make_pairs(e, y)
    a, b = np.triu_indices(len(y), k=1)  # every pair: 900 genuine, 19000 impostor
    assert len(pairs.score) == len(a) and pairs.same.sum() == 900
    assert np.allclose(pairs.score, np.sum(e[a] * e[b], axis=1), atol=1e-6)  # cosines in float32
    found = v.evaluate(e, y, thresholds={"verification": 0.3}, resamples=200)
    fpr, tpr, _ = roc_curve(y[a] == y[b], pairs.score, drop_intermediate=False)
    assert found.figures["auroc"] == pytest.approx(roc_auc_score(y[a] == y[b], pairs.score), abs=1e-12)
    for far in (1e-2, 1e-3):
        assert found.figures[f"tar_at_far_{v.far_name(far)}"] == pytest.approx(tpr[fpr <= far].max(), abs=1e-12)
    # EER: where FAR meets FRR, between the two ROC points around the crossing
    frr = 1 - tpr
    i = np.flatnonzero(frr <= fpr)[0]
    t = (frr[i - 1] - fpr[i - 1]) / ((frr[i - 1] - fpr[i - 1]) - (frr[i] - fpr[i]))
    assert found.figures["eer"] == pytest.approx(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]), abs=1e-12)
    same, accepted = y[a] == y[b], pairs.score >= 0.3
    assert found.figures["accuracy"] == pytest.approx((accepted[same].mean() + (~accepted[~same]).mean()) / 2)
    for name in ("auroc", "eer", "tar_at_far_1e-2", "accuracy", "rank1_k1"):
        ci = found.intervals[name]
        assert ci["low"] <= found.figures[name] <= ci["high"] and ci["high"] - ci["low"] > 0


def test_tar_at_far_needs_enough_impostor_pairs():
    e, y = people_embeddings(4, 10, spread=1.0)  # 600 impostor pairs: FAR 1e-2 allows 6 false accepts
    assert not any(k.startswith("tar_at_far") for k in v.evaluate(e, y, resamples=0).figures)


def test_thresholds_chosen_on_val_are_the_best_accuracy_and_the_false_alarm_rate():
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    same = np.array([1, 1, 0, 1, 0, 0, 0], bool)
    t = v.accuracy_threshold(score, same)
    best = max(v.pair_accuracy(score, same, c) for c in np.r_[score, 1.0])
    assert v.pair_accuracy(score, same, t) == best and 0.5 < t < 0.6
    impostors = np.linspace(0, 1, 1000)
    t = v.far_threshold(impostors, 1e-2)
    assert (impostors >= t).mean() <= 1e-2 and (impostors >= np.nextafter(t, -1) - 1e-3).mean() > 1e-2


def test_identification_on_a_gallery_made_by_hand():
    # three people; a search of person 2 looks like person 0 and is counted wrong at rank 1
    e = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0.9, 0, 0.1]], np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    y = np.array([0, 0, 1, 1, 2, 2])
    found = v.searches(e, y, k=1, open_set=False, draws=1)
    assert found is not None and found.gallery_size == 3 and len(found.person) == 3
    wrong = found.person == 2
    # whichever of person 2's photos is enrolled, the other one is nearer person 0 or to 2 by 0.1
    assert found.rank1[~wrong].all()
    strangers = v.searches(e, y, k=1, open_set=True, draws=4)
    assert strangers is not None and (~strangers.enrolled).any() and not strangers.rank1[~strangers.enrolled].any()


def test_open_set_dir_is_counted_at_the_val_threshold():
    e, y = people_embeddings(12, 8, spread=0.4)
    thresholds = v.choose_thresholds(e[y < 4], y[y < 4])
    test = v.evaluate(e[y >= 4], y[y >= 4], thresholds=thresholds, resamples=0).figures
    found = v.searches(e[y >= 4], y[y >= 4], k=1, open_set=True)
    mated = found.enrolled
    t = thresholds["open_set_k1"]
    assert test["dir_at_far_1e-2_k1"] == pytest.approx((found.rank1[mated] & (found.top[mated] >= t)).mean())
    assert test["false_alarm_rate_k1"] == pytest.approx((found.top[~mated] >= t).mean())


def test_enough_draws_that_the_enrolled_photo_hardly_moves_rank_1():
    # 20 people of 10 photos: which photo is enrolled decides many searches; the default draws
    # reach MIN_SEARCHES, and rank-1 between seeds varies less than with 5 draws
    e, y = people_embeddings(20, 10, spread=1.2)
    found = v.searches(e, y, k=1, open_set=False)
    assert found is not None and len(found.person) >= v.MIN_SEARCHES
    few = [v.searches(e, y, k=1, open_set=False, draws=5, seed=s).rank1.mean() for s in range(8)]
    many = [v.searches(e, y, k=1, open_set=False, seed=s).rank1.mean() for s in range(8)]
    assert 0.3 < np.mean(many) < 0.95  # neither trivial nor hopeless
    assert np.std(many) < 0.6 * np.std(few), (np.std(many), np.std(few))


def test_resamples_of_one_person_leave_the_accuracy_interval_without_a_warning():
    import warnings

    e, y = people_embeddings(2, 6, spread=0.8)  # a resample that draws one person has no impostor pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = v.evaluate(e, y, thresholds={"verification": 0.3}, resamples=200)
    ci = found.intervals["accuracy"]
    assert np.isfinite([ci["low"], ci["high"]]).all() and ci["low"] <= found.figures["accuracy"] <= ci["high"]
