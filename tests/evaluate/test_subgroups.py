"""Subgroup figures: per column value, against scikit-learn on the same subset; flags for small or
one-class subgroups; the recipe error for an unknown column; the written table and forest plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn import metrics as skm

from effft.cli import run
from effft.data.attributes import age_band, values
from effft.errors import RecipeError
from effft.evaluate.subgroups import MIN_IMAGES, subgroup_rows


def test_subgroup_rows_match_scikit_learn_on_each_subset():
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    p1 = 1 / (1 + np.exp(-rng.normal(2 * y - 1, 1.2)))
    probs = np.stack([1 - p1, p1], 1)
    site = np.where(np.arange(n) < 170, "A", "B")  # B: 30 images
    sex = np.array(["F", "M"] * (n // 2))
    sex[:10] = "X"  # ten images: flagged
    rows = subgroup_rows("binary", probs, y, {"site": list(site), "sex": list(sex)}, threshold=0.5, groups=None,
                         seed=0, resamples=300)
    by = {(r["column"], r["subgroup"], r["metric"]): r for r in rows}
    for column, values in (("site", site), ("sex", sex)):
        for value in set(values):
            at = values == value
            auroc = by[(column, value, "auroc")]
            assert auroc["n"] == int(at.sum()) and auroc["positives"] == int(y[at].sum())
            assert auroc["value"] == pytest.approx(skm.roc_auc_score(y[at], p1[at]))
            sens = by[(column, value, "sensitivity")]
            assert sens["value"] == pytest.approx(skm.recall_score(y[at], p1[at] >= 0.5))
            assert auroc["low"] <= auroc["value"] <= auroc["high"]
            assert (auroc["warning"] != "") == (at.sum() < MIN_IMAGES)
    assert "fewer than 30 images" in by[("sex", "X", "auroc")]["warning"]


def test_a_subgroup_without_positives_is_flagged():
    y = np.array([0] * 40 + [1] * 40)
    probs = np.stack([np.linspace(0.9, 0.1, 80), np.linspace(0.1, 0.9, 80)], 1)
    site = ["A"] * 40 + ["B"] * 40
    rows = subgroup_rows("binary", probs, y, {"site": site}, threshold=0.5, groups=None, seed=0, resamples=100)
    warnings = {r["subgroup"]: r["warning"] for r in rows}
    assert warnings == {"A": "no positives", "B": "no negatives"}


@pytest.mark.parametrize("age, band", [("045Y", "40-59"), ("006M", "0-17"), ("017Y", "0-17"), ("018Y", "18-39"),
                                       ("085Y", "80+"), ("010D", "0-17"), ("", "(unknown)"), ("abc", "(unknown)")])
def test_dicom_ages_fall_in_bands(age, band):
    assert age_band(age) == band


def _csv_data(root: Path) -> Path:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "site", "sex"])
        for i in range(48):
            label = ["normal", "abnormal"][i % 2]
            colour = np.array([200, 40, 40] if label == "abnormal" else [40, 40, 200])
            a = np.clip(rng.normal(colour, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / "images" / f"{i}.png")
            w.writerow([f"images/{i}.png", label, "north" if i < 32 else "south", "F" if i % 3 else "M"])
    return root


def _recipe(tmp_path: Path, subgroups: list[str]) -> Path:
    data = _csv_data(tmp_path / "data") if not (tmp_path / "data").exists() else tmp_path / "data"
    recipe = {"name": "sg", "output_dir": str(tmp_path / "runs"), "model": {"arch": "efficientnet_b0", "pretrained": False},
              "data": {"adapter": "csv", "root": str(data), "csv": {"file": "labels.csv"}, "image_size": 32,
                       "batch_size": 8, "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
              "report": {"subgroups": subgroups, "error_grid": 0}, "trainer": {"max_epochs": 1},
              "card": {"intended_use": "research on colours only"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_an_unknown_subgroup_column_is_a_recipe_error_naming_the_columns(tmp_path, capsys):
    assert run(["-q", "fit", str(_recipe(tmp_path, ["site", "hospital"]))]) == 2
    err = capsys.readouterr().err
    assert "'hospital' is not a column" in err and "image, label, site, sex" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_fit_writes_subgroup_figures_and_a_forest_plot(tmp_path):
    assert run(["-q", "fit", str(_recipe(tmp_path, ["site", "sex"]))]) == 0
    run_dir = tmp_path / "runs" / "sg"
    written = json.loads((run_dir / "metrics.json").read_text())["subgroups"]["test"]
    with open(run_dir / "report" / "predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    with open(tmp_path / "data" / "labels.csv", newline="") as f:
        site = {str((tmp_path / "data" / r["image"])): r["site"] for r in csv.DictReader(f)}
    counts: dict[str, int] = {}
    for r in predictions:
        counts[site[r["path"]]] = counts.get(site[r["path"]], 0) + 1
    got = {r["subgroup"]: r["n"] for r in written if r["column"] == "site" and r["metric"] == "auroc"}
    assert got == counts and sum(got.values()) == len(predictions) == 12
    assert all(r["warning"].startswith("fewer than 30") for r in written)  # 12 test images in all
    with open(run_dir / "report" / "subgroups.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(written)
    with Image.open(run_dir / "report" / "subgroups.png") as im:
        assert im.format == "PNG" and im.size[1] > 100
    summary = (run_dir / "summary.md").read_text()  # the short text version: subgroups and the card too
    assert "## Subgroups" in summary and "| site | north |" in summary and "| sex | F |" in summary
    assert "- intended use: research on colours only" in summary
    assert "research on colours only" in (run_dir / "report.html").read_text()


def test_dicom_headers_give_sex_age_band_and_manufacturer(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from effft.config.load import validate
    from effft.data.sources._common import Item

    paths = []
    for i, (sex, age) in enumerate((("F", "045Y"), ("M", "072Y"), ("", ""))):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientSex, ds.PatientAge, ds.Manufacturer = sex, age, "Acme" if i < 2 else ""
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1])
    (tmp_path / "not_dicom.dcm").write_text("text")
    paths.append(tmp_path / "not_dicom.dcm")
    recipe = validate({"name": "d", "data": {"adapter": "dicom", "root": str(tmp_path)}})
    items = [Item(path=str(p), target=0) for p in paths]
    got = values(recipe.data, items, ["PatientSex", "age_band", "Manufacturer"])
    assert got == {"PatientSex": ["F", "M", "(unknown)", "(unknown)"],
                   "age_band": ["40-59", "60-79", "(unknown)", "(unknown)"],
                   "Manufacturer": ["Acme", "Acme", "(unknown)", "(unknown)"]}
    with pytest.raises(RecipeError, match="'site' is not a column"):
        values(recipe.data, items, ["PatientSex", "site"])
