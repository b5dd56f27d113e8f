"""The positive class of two-class data: chosen by name or by metrics.positive_class, ordered second."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from effft.cli import run
from effft.config.load import validate
from effft.data.dataset import load_data
from effft.data.positive import positive_index, says_finding
from effft.errors import RecipeError
from effft.evaluate.metrics import MetricSet


def _breast(path: Path) -> Path:
    """BreastMNIST's convention: label 0 malignant, label 1 benign or normal."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 6), ("test", 10)):
        labels = np.arange(n) % 2
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


def _data(tmp_path: Path, positive: str | None = None):
    recipe = validate({"name": "p", "data": {"adapter": "medmnist", "root": str(tmp_path),
                                "medmnist": {"file": _breast(tmp_path / "b.npz").name,
                                             "classes": ["malignant", "benign_or_normal"]}},
                       "metrics": {"positive_class": positive}})
    return load_data(recipe.data, channels=1, seed=0, progress=False, positive_class=recipe.metrics.positive_class)


@pytest.mark.parametrize("name, finding", [
    ("malignant", True), ("Tumor", True), ("yes", True), ("pneumonia", True), ("abnormal", True),
    ("benign_or_normal", False), ("no_tumor", False), ("no", False), ("normal", False), ("healthy", False),
    ("non-malignant", False), ("cat", False)])
def test_a_class_name_says_whether_it_is_the_finding(name, finding):
    assert says_finding(name) is finding


def test_the_positive_class_by_name_and_by_default():
    assert positive_index(["malignant", "benign_or_normal"], None)[0] == 0
    assert positive_index(["no_tumor", "tumor"], None)[0] == 1
    assert positive_index(["no", "yes"], None)[0] == 1
    assert positive_index(["cat", "dog"], None)[0] == 1  # nothing said: label 1
    assert positive_index(["tumor", "lesion"], None)[0] == 1  # both said: label 1
    assert positive_index(["cat", "dog"], "cat")[0] == 0


def test_breastmnist_labels_make_malignant_the_positive_class(tmp_path, caplog):
    with caplog.at_level("INFO"):
        data = _data(tmp_path)
    assert data.classes == ["benign_or_normal", "malignant"]
    assert "positive class: 'malignant'" in caplog.text
    # label 0 of the file (malignant) is now target 1; every image keeps its class name
    for it in data.items:
        index = int(it.path.rsplit("/", 1)[1])
        assert data.classes[it.target] == ("malignant" if index % 2 == 0 else "benign_or_normal")


def test_an_explicit_positive_class_swaps_sensitivity_and_specificity(tmp_path):
    default, given = _data(tmp_path), _data(tmp_path, positive="benign_or_normal")
    assert given.classes == ["malignant", "benign_or_normal"]
    # one model's scores for each test image, P(malignant), the same under both orders
    test = [it for it in default.items if it.split == "test"]
    p_malignant = torch.tensor([0.9, 0.2, 0.8, 0.7, 0.6, 0.1, 0.3, 0.65, 0.55, 0.35])
    figures = {}
    for data in (default, given):
        y = torch.tensor([it.target for it in data.items if it.split == "test"])
        names = [data.classes[t] for t in y]
        assert names == [default.classes[it.target] for it in test]
        p_mal = p_malignant if data.classes[1] == "malignant" else 1 - p_malignant
        logits = torch.stack([torch.zeros(10), torch.logit(p_mal)], 1)  # softmax gives P(classes[1])
        m = MetricSet(task="binary", num_classes=2, classes=data.classes)
        m.update(logits, y)
        figures[data.classes[1]] = m.compute(threshold=0.5)
    mal, ben = figures["malignant"], figures["benign_or_normal"]
    assert mal["sensitivity"] != mal["specificity"]
    assert mal["sensitivity"] == pytest.approx(ben["specificity"])
    assert mal["specificity"] == pytest.approx(ben["sensitivity"])


def test_an_unknown_positive_class_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match=r"metrics.positive_class is 'cancer'.*'malignant', 'benign_or_normal'"):
        _data(tmp_path, positive="cancer")


def test_a_positive_class_on_many_classes_is_a_recipe_error(tmp_path, capsys):
    for c in ("a", "b", "c"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(3):
            from PIL import Image

            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "d" / c / f"{i}.png")
    recipe = {"name": "p", "output_dir": str(tmp_path / "runs"), "model": {"arch": "efficientnet_b0", "pretrained": False},
              "data": {"adapter": "folder", "root": str(tmp_path / "d"), "image_size": 32},
              "metrics": {"positive_class": "a"}, "trainer": {"max_epochs": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert run(["fit", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "metrics.positive_class" in err and "two-class data" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
