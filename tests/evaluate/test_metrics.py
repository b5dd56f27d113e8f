"""MetricSet against scikit-learn on the same predictions; threshold choice against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from effft.evaluate.metrics import (
    MetricSet,
    choose_threshold,
    metric_direction,
    metric_names,
    predict,
)

TOL = 1e-6


def _names(n: int) -> list[str]:
    return [f"class {i}" for i in range(n)]


def _multiclass_case(n: int = 7, per_class: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(n).repeat(per_class)[torch.randperm(n * per_class, generator=g)]
    # logits leaning towards the truth, so the metrics are not all near chance
    logits = torch.randn(len(target), n, generator=g) + 1.5 * torch.nn.functional.one_hot(target, n)
    return logits, target


def _feed(ms: MetricSet, logits: torch.Tensor, target: torch.Tensor, batch: int = 16) -> None:
    for i in range(0, len(target), batch):
        ms.update(logits[i : i + batch], target[i : i + batch])


def _ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges, right=False) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return total


def test_multiclass_matches_sklearn():
    logits, target = _multiclass_case()
    ms = MetricSet(task="multiclass", num_classes=7, classes=_names(7))
    _feed(ms, logits, target)
    probs, y = ms.probabilities().numpy(), ms.targets().numpy()
    assert np.allclose(probs, logits.softmax(1).numpy(), atol=1e-6)
    assert (y == target.numpy()).all()
    got = ms.compute()
    pred = probs.argmax(1)
    labels = list(range(7))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=TOL)
    assert got["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=5, labels=labels), abs=TOL)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=TOL)
    assert got["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=TOL)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-5)
    assert got["ece"] == pytest.approx(_ece(probs.max(1), (pred == y).astype(float)), abs=1e-5)
    precision = skm.precision_score(y, pred, average=None, zero_division=0)
    recall = skm.recall_score(y, pred, average=None, zero_division=0)
    for i, name in enumerate(_names(7)):
        assert got[f"precision/{name}"] == pytest.approx(precision[i], abs=TOL)
        assert got[f"recall/{name}"] == pytest.approx(recall[i], abs=TOL)
    assert 0.3 < got["accuracy"] < 1.0  # the case is neither trivial nor hopeless


def test_multiclass_class_absent_from_the_targets_is_left_out_of_the_means(recwarn):
    logits, target = _multiclass_case(n=5, per_class=8, seed=3)
    keep = target != 3  # class 3 never occurs, as in a small validation split
    logits, target = logits[keep], target[keep]
    logits[:4, 3] += 4.0  # but it is predicted a few times
    ms = MetricSet(task="multiclass", num_classes=5, classes=_names(5))
    _feed(ms, logits, target)
    got = ms.compute()
    probs, y = logits.softmax(1).numpy(), target.numpy()
    pred = probs.argmax(1)
    assert (pred == 3).sum() >= 1
    assert math.isnan(got["recall/class 3"]) and got["precision/class 3"] == 0.0
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=TOL)
    ovr = [skm.roc_auc_score(y == k, probs[:, k]) for k in (0, 1, 2, 4)]
    assert got["auroc"] == pytest.approx(np.mean(ovr), abs=1e-5)
    assert not [w for w in recwarn if "positive samples" in str(w.message)]
    one = MetricSet(task="multiclass", num_classes=5, classes=_names(5))
    one.update(logits[y == 0], target[y == 0])
    assert math.isnan(one.compute()["auroc"]) and one.compute()["balanced_accuracy"] == pytest.approx(
        float((pred[y == 0] == 0).mean()), abs=TOL)


def test_batches_and_reset():
    logits, target = _multiclass_case(seed=1)
    whole = MetricSet(task="multiclass", num_classes=7, classes=_names(7))
    whole.update(logits, target)
    batched = MetricSet(task="multiclass", num_classes=7, classes=_names(7))
    batched.update(torch.randn(5, 7), torch.zeros(5, dtype=torch.long))  # a previous epoch
    batched.reset()
    _feed(batched, logits, target, batch=10)
    assert whole.compute() == pytest.approx(batched.compute(), abs=1e-7)


def _binary_case(n: int = 80, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, generator=g) < 0.4).long()
    target[:2] = torch.tensor([0, 1])
    logits = torch.randn(n, 2, generator=g)
    logits[:, 1] += 1.2 * target
    return logits, target


def test_binary_matches_sklearn_at_the_chosen_threshold():
    logits, target = _binary_case()
    ms = MetricSet(task="binary", num_classes=2, classes=["negative", "positive"])
    _feed(ms, logits, target)
    p1 = logits.softmax(1)[:, 1].numpy()
    y = target.numpy()
    assert np.allclose(ms.probabilities()[:, 1].numpy(), p1, atol=1e-6)
    t = choose_threshold(ms.probabilities(), ms.targets())
    got = ms.compute(threshold=t)
    pred = (p1 >= t).astype(int)
    assert got["threshold"] == t
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=TOL)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=TOL)
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred), abs=TOL)
    assert got["sensitivity"] == pytest.approx(skm.recall_score(y, pred), abs=TOL)
    assert got["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0), abs=TOL)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, p1), abs=1e-5)
    assert got["average_precision"] == pytest.approx(skm.average_precision_score(y, p1), abs=1e-5)
    assert got["ece"] == pytest.approx(_ece(p1, y.astype(float)), abs=1e-5)
    # the default operating point is 0.5, and it changes the thresholded metrics
    at_half = ms.compute()
    assert at_half["threshold"] == 0.5
    assert at_half["accuracy"] == pytest.approx(skm.accuracy_score(y, (p1 >= 0.5).astype(int)), abs=TOL)


def test_binary_single_logit_head_equals_two_logits():
    logits, target = _binary_case(seed=3)
    two = MetricSet(task="binary", num_classes=2, classes=["a", "b"])
    two.update(logits, target)
    one = MetricSet(task="binary", num_classes=2, classes=["a", "b"])
    one.update((logits[:, 1] - logits[:, 0]).unsqueeze(1), target)  # same P(b)
    assert torch.allclose(one.probabilities(), two.probabilities(), atol=1e-6)


def _multilabel_case(n: int = 60, labels: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, labels, generator=g) < 0.35).long()
    logits = torch.randn(n, labels, generator=g) + 1.5 * target
    return logits, target


def test_multilabel_matches_sklearn():
    logits, target = _multilabel_case()
    names = ["effusion", "nodule", "mass", "edema"]
    ms = MetricSet(task="multilabel", num_classes=4, classes=names)
    _feed(ms, logits, target)
    probs, y = logits.sigmoid().numpy(), target.numpy()
    assert np.allclose(ms.probabilities().numpy(), probs, atol=1e-6)
    got = ms.compute()
    auroc = skm.roc_auc_score(y, probs, average=None)
    ap = skm.average_precision_score(y, probs, average=None)
    assert got["auroc"] == pytest.approx(auroc.mean(), abs=1e-5)
    assert got["map"] == pytest.approx(ap.mean(), abs=1e-5)
    f1 = skm.f1_score(y, (probs >= 0.5).astype(int), average="macro", zero_division=0)
    assert got["f1_macro"] == pytest.approx(f1, abs=TOL)
    for i, name in enumerate(names):
        assert got[f"auroc/{name}"] == pytest.approx(auroc[i], abs=1e-5)
        assert got[f"ap/{name}"] == pytest.approx(ap[i], abs=1e-5)


def test_multilabel_label_without_positives_is_nan_and_left_out_of_the_mean():
    logits, target = _multilabel_case(seed=2)
    target[:, 2] = 0
    ms = MetricSet(task="multilabel", num_classes=4, classes=list("abcd"))
    ms.update(logits, target)
    got = ms.compute()
    assert math.isnan(got["auroc/c"]) and math.isnan(got["ap/c"])
    keep = [0, 1, 3]
    probs, y = logits.sigmoid().numpy()[:, keep], target.numpy()[:, keep]
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, probs, average="macro"), abs=1e-5)
    assert got["map"] == pytest.approx(skm.average_precision_score(y, probs, average="macro"), abs=1e-5)


def _rates(scores: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float, int]:
    pred = scores >= t
    return pred[y == 1].mean(), 1 - pred[y == 0].mean(), int((pred & (y == 0)).sum())


@pytest.mark.parametrize("seed", range(5))
def test_youden_threshold_is_the_brute_force_best(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(50) < 0.5).astype(int)
    y[:2] = [0, 1]
    scores = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), 2).astype(np.float32)  # ties
    best_j = max(sum(_rates(scores, y, t)[:2]) - 1 for t in np.unique(scores))
    t = choose_threshold(torch.from_numpy(scores), torch.from_numpy(y))
    sens, spec, _ = _rates(scores, y, t)
    assert sens + spec - 1 == pytest.approx(best_j, abs=1e-9)
    assert t in set(np.unique(scores).tolist())


@pytest.mark.parametrize("target_sens", [0.5, 0.8, 0.9, 1.0])
def test_sensitivity_threshold_reaches_the_target_with_fewest_false_positives(target_sens):
    rng = np.random.default_rng(7)
    y = (rng.random(60) < 0.4).astype(int)
    scores = np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1).astype(np.float32)
    t = choose_threshold(
        torch.from_numpy(scores), torch.from_numpy(y), method="sensitivity", target_sensitivity=target_sens
    )
    sens, _, fp = _rates(scores, y, t)
    assert sens >= target_sens
    feasible_fp = [_rates(scores, y, c)[2] for c in np.unique(scores) if _rates(scores, y, c)[0] >= target_sens]
    assert fp == min(feasible_fp)


def test_threshold_from_two_column_probs_fixed_and_one_class():
    logits, target = _binary_case(seed=5)
    probs = logits.softmax(1)
    assert choose_threshold(probs, target) == choose_threshold(probs[:, 1], target)
    assert choose_threshold(probs, target, method="fixed", value=0.3) == 0.3
    assert choose_threshold(probs, torch.zeros_like(target)) == 0.5  # ROC undefined
    with pytest.raises(ValueError, match="unknown threshold method"):
        choose_threshold(probs, target, method="median")
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold(probs, target, method="sensitivity")


@pytest.mark.parametrize("n", [3, 5, 6, 10])
def test_top5_only_with_more_than_five_classes_and_names_match(n):
    logits, target = _multiclass_case(n=n, per_class=3)
    ms = MetricSet(task="multiclass", num_classes=n, classes=_names(n))
    ms.update(logits, target)
    got = ms.compute()
    assert ("top5_accuracy" in got) == (n > 5)
    assert list(got) == metric_names(task="multiclass", classes=_names(n))


def test_names_match_for_binary_and_multilabel():
    logits, target = _binary_case()
    ms = MetricSet(task="binary", num_classes=2, classes=["no", "yes"])
    ms.update(logits, target)
    assert list(ms.compute(threshold=0.4)) == metric_names(task="binary", classes=["no", "yes"])
    logits, target = _multilabel_case()
    ms = MetricSet(task="multilabel", num_classes=4, classes=list("abcd"))
    ms.update(logits, target)
    assert list(ms.compute()) == metric_names(task="multilabel", classes=list("abcd"))


def test_misuse_raises():
    with pytest.raises(ValueError, match="2 classes"):
        MetricSet(task="binary", num_classes=3, classes=list("abc"))
    ms = MetricSet(task="multiclass", num_classes=3, classes=list("abc"))
    with pytest.raises(RuntimeError, match="no predictions"), pytest.warns(UserWarning, match="before"):
        ms.compute()
    with pytest.raises(ValueError, match="3 logits"):
        ms.update(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    ms.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="binary"):
        ms.compute(threshold=0.3)


def test_predict_rules():
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    assert predict(probs, task="binary").tolist() == [0, 1, 1]  # >= threshold is positive
    assert predict(probs, task="binary", threshold=0.7).tolist() == [0, 1, 0]
    assert predict(probs, task="multilabel").tolist() == [[1, 0], [0, 1], [1, 1]]


@pytest.mark.parametrize(
    ("name", "direction"),
    [
        ("val/loss", "min"),
        ("train/loss", "min"),
        ("val/ece", "min"),
        ("loss", "min"),
        ("val/auroc", "max"),
        ("test/balanced_accuracy", "max"),
        ("val/recall/loss", "max"),  # a class called "loss"
        ("map", "max"),
    ],
)
def test_metric_direction(name, direction):
    assert metric_direction(name) == direction


def _ddp_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    logits, target = _multiclass_case(seed=4)
    mine = slice(0, 25) if rank == 0 else slice(25, None)  # uneven shares
    ms = MetricSet(task="multiclass", num_classes=7, classes=_names(7))
    ms.update(logits[mine], target[mine])
    got = ms.compute()
    if rank == 0:
        torch.save({"metrics": got, "probs": ms.probabilities(), "targets": ms.targets()}, result_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_see_all_predictions(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    logits, target = _multiclass_case(seed=4)
    assert torch.allclose(out["probs"], logits.softmax(1), atol=1e-6)
    assert torch.equal(out["targets"], target)
    single = MetricSet(task="multiclass", num_classes=7, classes=_names(7))
    single.update(logits, target)
    assert out["metrics"] == pytest.approx(single.compute(), abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_give_the_cpu_results():
    cases = {
        "multiclass": (_multiclass_case(), _names(7)),
        "binary": (_binary_case(), ["no", "yes"]),
        "multilabel": (_multilabel_case(), list("abcd")),
    }
    for task, ((logits, target), classes) in cases.items():
        if task == "multilabel":
            target[:, 0] = 0  # one label without positives: the NaN path
        results = []
        for device in ("cpu", "cuda"):
            ms = MetricSet(task=task, num_classes=len(classes), classes=classes).to(device)
            ms.update(logits.to(device), target.to(device))
            t = choose_threshold(ms.probabilities(), ms.targets()) if task == "binary" else None
            results.append(ms.compute(threshold=t))
        cpu, cuda = results
        assert list(cpu) == list(cuda)
        for name in cpu:
            assert cuda[name] == pytest.approx(cpu[name], abs=1e-5, nan_ok=True), (task, name)


def test_multilabel_with_one_ranked_label_matches_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    probs = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.3, 0.6], [0.8, 0.6, 0.4], [0.3, 0.1, 0.2]])
    target = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]])  # only label 0 has 0s and 1s
    ms = MetricSet(task="multilabel", num_classes=3, classes=["a", "b", "c"])
    ms.update(torch.logit(probs), target)
    out = ms.compute()
    assert out["auroc/a"] == pytest.approx(roc_auc_score(target[:, 0], probs[:, 0]))
    assert out["ap/a"] == pytest.approx(average_precision_score(target[:, 0], probs[:, 0]))
    assert out["auroc"] == pytest.approx(out["auroc/a"]) and math.isnan(out["auroc/b"])


@pytest.mark.parametrize("task, classes", [("multiclass", 3), ("binary", 2), ("multilabel", 3)])
def test_one_prediction_has_the_shapes_of_many(task, classes):
    """A val or test split of one image: torchmetrics' CatMetric gives a single value back as a 0-d tensor."""
    ms = MetricSet(task=task, num_classes=classes, classes=_names(classes))
    target = torch.tensor([[1.0] + [0.0] * (classes - 1)]) if task == "multilabel" else torch.tensor([1])
    ms.update(torch.randn(1, classes), target)
    assert ms.probabilities().shape == (1, classes)
    assert ms.targets().shape == ((1, classes) if task == "multilabel" else (1,))
    assert ms.compute()  # every metric of the task, without an error


def test_the_ece_of_a_calibrated_model_matches_torchmetrics_on_drawn_outcomes():
    from torchmetrics.functional.classification import binary_calibration_error

    from effft.evaluate.metrics import calibrated_ece

    rng = np.random.default_rng(3)
    c = torch.from_numpy(rng.uniform(0.5, 1.0, 150))
    mean, p90 = calibrated_ece(c, draws=4000, seed=1)
    # the same quantity from outcomes drawn here and torchmetrics' ECE of each set
    drawn = [float(binary_calibration_error(c.float(), torch.from_numpy(rng.random(150) < c.numpy()).long(),
                                            n_bins=15)) for _ in range(1500)]
    assert mean == pytest.approx(np.mean(drawn), abs=0.004)
    assert p90 == pytest.approx(np.quantile(drawn, 0.9), abs=0.01)
    assert calibrated_ece(c, seed=1) == calibrated_ece(c, seed=1)  # seeded
    # sampling noise: it shrinks as the split grows, and certainty that is always right has none
    bigger = torch.from_numpy(rng.uniform(0.5, 1.0, 6000))
    assert calibrated_ece(bigger)[0] < mean / 3
    assert calibrated_ece(torch.ones(40)) == (0.0, 0.0)
