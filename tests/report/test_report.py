"""The report files: present, readable images, tables that agree with the predictions."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effft.evaluate.metrics import MetricSet, choose_threshold
from effft.report.figures import write_report
from effft.report.summary import summary_md, write_summary

CASES = {
    "multiclass": ["cat", "dog", "fox", "owl"],
    "binary": ["no tumour", "tumour"],
    "multilabel": ["effusion", "nodule", "mass"],
}


def _metric_set(task: str, n_items: int = 40, seed: int = 0) -> MetricSet:
    classes = CASES[task]
    n = len(classes)
    g = torch.Generator().manual_seed(seed)
    if task == "multilabel":
        target = (torch.rand(n_items, n, generator=g) < 0.4).long()
        logits = torch.randn(n_items, n, generator=g) + 1.5 * target
    else:
        target = torch.randint(0, n, (n_items,), generator=g)
        logits = torch.randn(n_items, n, generator=g) + 1.5 * torch.nn.functional.one_hot(target, n)
    ms = MetricSet(task=task, num_classes=n, classes=classes)
    ms.update(logits, target)
    return ms


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", params=list(CASES))
def report(request, tmp_path_factory):
    task = request.param
    ms = _metric_set(task)
    threshold = choose_threshold(ms.probabilities(), ms.targets()) if task == "binary" else None
    out = tmp_path_factory.mktemp(task) / "report" / "test"  # parents are created
    paths = [f"images/{i:03d}.png" for i in range(len(ms.targets()))]
    write_report(
        out, task=task, classes=CASES[task], probs=ms.probabilities(), targets=ms.targets(),
        threshold=threshold, paths=paths, title="test",
    )
    return task, ms, threshold, paths, out


def test_files_exist_and_images_are_valid_png(report):
    _, _, _, _, out = report
    task = report[0]
    names = sorted(p.name for p in out.iterdir())
    pr = ["pr.png"] if task == "binary" else []  # precision-recall of the positive class
    assert names == sorted(["confusion_matrix.png", "per_class.csv", "predictions.csv", "reliability.png",
                            "roc.png", *pr])  # no temp files
    for png in ("confusion_matrix.png", "roc.png", "reliability.png", *pr):
        with Image.open(out / png) as im:
            im.verify()
        with Image.open(out / png) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_per_class_rows_support_and_agreement_with_metricset(report):
    task, ms, threshold, _, out = report
    rows = _read_csv(out / "per_class.csv")
    classes = CASES[task]
    assert [r["class"] for r in rows] == classes
    y = ms.targets()
    support = y.sum(0) if task == "multilabel" else torch.bincount(y, minlength=len(classes))
    assert [int(r["support"]) for r in rows] == support.tolist()
    got = ms.compute(threshold=threshold)
    # per_class.csv (scikit-learn) and MetricSet (torchmetrics) describe the same predictions
    for r in rows:
        c = r["class"]
        if task == "multiclass":
            assert float(r["precision"]) == pytest.approx(got[f"precision/{c}"], abs=1e-5)
            assert float(r["recall"]) == pytest.approx(got[f"recall/{c}"], abs=1e-5)
        if task == "multilabel":
            assert float(r["auroc"]) == pytest.approx(got[f"auroc/{c}"], abs=1e-5)
            assert float(r["average_precision"]) == pytest.approx(got[f"ap/{c}"], abs=1e-5)
    if task == "binary":
        negative, positive = rows
        assert float(positive["recall"]) == pytest.approx(got["sensitivity"], abs=1e-5)
        assert float(negative["recall"]) == pytest.approx(got["specificity"], abs=1e-5)
        assert float(positive["auroc"]) == pytest.approx(got["auroc"], abs=1e-5)
        assert float(positive["f1"]) == pytest.approx(got["f1"], abs=1e-5)


def test_predictions_csv(report):
    task, ms, threshold, paths, out = report
    rows = _read_csv(out / "predictions.csv")
    classes = CASES[task]
    probs, y = ms.probabilities().numpy(), ms.targets().numpy()
    assert [r["path"] for r in rows] == paths
    got_probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    assert np.allclose(got_probs, probs, atol=1e-5)
    for r, p, t in zip(rows, probs, y):
        if task == "multilabel":
            assert r["target"] == ";".join(c for c, v in zip(classes, t) if v)
            assert r["predicted"] == ";".join(c for c, v in zip(classes, p) if v >= 0.5)
        else:
            assert r["target"] == classes[t]
            predicted = int(p[1] >= threshold) if task == "binary" else int(p.argmax())
            assert r["predicted"] == classes[predicted]


def test_no_roc_when_one_class_only(tmp_path):
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    write_report(tmp_path, task="binary", classes=["a", "b"], probs=probs, targets=torch.zeros(3, dtype=torch.long))
    assert not (tmp_path / "roc.png").exists()
    rows = _read_csv(tmp_path / "per_class.csv")
    assert [r["support"] for r in rows] == ["3", "0"] and rows[0]["auroc"] == ""
    assert "path" not in _read_csv(tmp_path / "predictions.csv")[0]


def test_paths_must_match_predictions(tmp_path):
    ms = _metric_set("binary", n_items=6)
    with pytest.raises(ValueError, match="5 paths for 6"):
        write_report(tmp_path, task="binary", classes=CASES["binary"], probs=ms.probabilities(),
                     targets=ms.targets(), paths=["x"] * 5)


def test_summary(tmp_path):
    val = _metric_set("binary", seed=1)
    test = _metric_set("binary", seed=2)
    t = choose_threshold(val.probabilities(), val.targets())
    by_split = {"val": val.compute(threshold=t), "test": test.compute(threshold=t)}
    path = write_summary(
        tmp_path, recipe_name="brain-mri", model_name="efficientnet_b0", weights="imagenet (hub)",
        metrics_by_split=by_split, threshold=t,
        files={"test report": "report/test", "best checkpoint": Path("checkpoints/best.ckpt")},
    )
    text = path.read_text()
    assert path == tmp_path / "summary.md" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]
    assert text == summary_md(recipe_name="brain-mri", model_name="efficientnet_b0", weights="imagenet (hub)",
                              metrics_by_split=by_split, threshold=t,
                              files={"test report": "report/test", "best checkpoint": "checkpoints/best.ckpt"})
    assert "imagenet (hub)" in text and "efficientnet_b0" in text and f"{t:.4g}" in text
    lines = text.splitlines()
    assert "| metric | val | test |" in lines
    row = next(line for line in lines if line.startswith("| auroc |"))
    assert row == f"| auroc | {by_split['val']['auroc']:.4f} | {by_split['test']['auroc']:.4f} |"
    assert "`checkpoints/best.ckpt`" in text


def test_summary_skips_per_class_entries_and_marks_missing_and_nan():
    text = summary_md(
        recipe_name="r", model_name="m", weights="none",
        metrics_by_split={"val": {"accuracy": 0.5, "recall/cat": 0.1}, "test": {"auroc": float("nan")}},
    )
    assert "recall/cat" not in text and "threshold" not in text
    assert "| accuracy | 0.5000 | - |" in text
    assert "| auroc | - | n/a |" in text


def test_reliability_bins_agree_with_scikit_learn_and_the_ece():
    from sklearn.calibration import calibration_curve
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    from effft.report.figures import calibration_points, reliability_bins

    rng = np.random.default_rng(0)
    p1 = rng.uniform(size=500)
    y = (rng.uniform(size=500) < p1 ** 2).astype(int)  # over-confident about the positives
    probs = np.stack([1 - p1, p1], axis=1)
    said, outcome = calibration_points("binary", probs, y)
    mean_said, frequency, counts = reliability_bins(said, outcome)
    want_freq, want_said = calibration_curve(y, p1, n_bins=15, strategy="uniform")
    assert np.allclose(frequency, want_freq) and np.allclose(mean_said, want_said)
    ece = np.sum(counts * np.abs(frequency - mean_said)) / counts.sum()
    assert ece == pytest.approx(float(binary_calibration_error(torch.tensor(p1), torch.tensor(y), n_bins=15)), abs=1e-6)
    logits = torch.tensor(rng.normal(size=(400, 4)) * 2)
    targets = torch.tensor(rng.integers(0, 4, 400))
    p = logits.softmax(-1).numpy()
    mean_said, frequency, counts = reliability_bins(*calibration_points("multiclass", p, targets.numpy()))
    ece = np.sum(counts * np.abs(frequency - mean_said)) / counts.sum()
    assert ece == pytest.approx(float(multiclass_calibration_error(logits.softmax(-1), targets, 4, n_bins=15)), abs=1e-5)
