"""report.html: one self-contained page per run (and per cross-validation), built from fake run
directories written here by hand."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from effft.report.html import write_cv_report, write_html_report

RUN_SECTIONS = ["data", "training", "results", "subgroups", "errors", "card", "checklist"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["no tumour", "tumour"]
# (path, label, group, split): P3 is the patient put in train and test when `leak` is asked for
SPLIT_ROWS = [
    ("a/1.png", "no tumour", "P1", "train"), ("a/2.png", "tumour", "P1", "train"),
    ("a/3.png", "tumour", "P2", "train"), ("a/4.png", "no tumour", "P3", "train"),
    ("a/5.png", "tumour", "P4", "val"), ("a/6.png", "no tumour", "P5", "val"),
    ("a/7.png", "tumour", "P6", "test"), ("a/8.png", "no tumour", "P6", "test"),
    ("a/9.png", "no tumour", "P7", "test"),
]


class Page(HTMLParser):
    """The parts of a page the tests look at: every tag with its attributes, the <h2> ids in
    order, the tables by section (rows of cell texts), and each <tr>'s attributes."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.h2_ids: list[str] = []
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.rows_by_item: dict[str, list[str]] = {}
        self.section = ""
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._item: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "h2" and a.get("id"):
            self.section = a["id"] or ""
            self.h2_ids.append(self.section)
        elif tag == "table":
            self.tables.setdefault(self.section, []).append([])
        elif tag == "tr":
            self._row, self._item = [], a.get("data-item")
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self.section][-1].append(self._row)
            if self._item:
                self.rows_by_item[self._item] = self._row
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _png(path: Path, colour: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path, format="PNG")


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _interval(value: float, low: float, high: float) -> dict[str, object]:
    return {"value": value, "low": low, "high": high, "method": "patient bootstrap"}


def _operating_row(name: str, threshold: float) -> dict[str, object]:
    row: dict[str, object] = {"operating_point": name, "threshold": threshold, "tp": 1, "fp": 0, "tn": 2, "fn": 0,
                              "f1": 1.0}
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        row.update({k: 1.0, f"{k}_low": 0.2, f"{k}_high": None if k == "npv" else 1.0})
    return row


def make_run(root: Path, *, leak: bool = False, card: dict[str, str] | None = None, training: bool = True,
             errors: bool = True, operating: bool = True, bad_reason: str = "cannot be read",
             subgroups: bool = True, test_auroc: float = 0.875) -> Path:
    """A finished binary run directory with the files `effft fit` leaves (figures as tiny PNGs)."""
    root.mkdir(parents=True, exist_ok=True)
    recipe = {"name": "tumour-demo", "model": {"arch": "efficientnet_b0"},
              "data": {"adapter": "folder", "root": "/data/tumours"},
              "report": {"subgroups": ["sex"] if subgroups else [], "error_grid": 8}}
    if card is not None:
        recipe["card"] = card
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    metrics: dict[str, object] = {
        "val": {"accuracy": 0.5, "auroc": 0.75, "recall/tumour": 0.5},
        "test": {"accuracy": 2 / 3, "auroc": test_auroc, "ece": 0.1, "nll": None, "recall/tumour": 1.0},
        "intervals": {"test": {"auroc": _interval(test_auroc, 0.61234, 0.99), "accuracy": _interval(2 / 3, 0.2, 0.9)}},
    }
    if operating:
        metrics["operating_points"] = {"test": [_operating_row("run's threshold", 0.42), _operating_row("0.5", 0.5)]}
    (root / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (root / "summary.md").write_text("# tumour-demo\n\n> split by patient: 7 patients, 9 images\n\n"
                                     "- model: `efficientnet_b0`\n", encoding="utf-8")
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES, "task": "binary"}), encoding="utf-8")
    rows = [list(r) for r in SPLIT_ROWS] + ([["a/10.png", "tumour", "P3", "test"]] if leak else [])
    _csv(root / "splits.csv", ["path", "frame", "label", "group", "split"],
         [[p, "", lab, g, s] for p, lab, g, s in rows])
    _csv(root / "bad_files.csv", ["path", "reason"], [["a/broken.png", bad_reason]])
    report = root / "report"
    if training:
        report.mkdir(parents=True, exist_ok=True)
        (report / "training.json").write_text(json.dumps({
            "weights": "imagenet (timm)", "epochs": 3, "seconds": 125.0, "hardware": "x86_64, 2 CPU cores",
            "versions": {"effft": "0.1.0", "torch": "2.5.1", "lightning": "2.6.0"},
            "image_sizes": {"sampled": 12, "width": {"min": 40, "median": 64.0, "max": 96},
                            "height": {"min": 30, "median": 48.0, "max": 50}}}), encoding="utf-8")
    for name in ("roc.png", "confusion_matrix.png") + (("errors.png",) if errors else ()):
        _png(report / name)
    if subgroups:
        _png(report / "subgroups.png")
        _csv(report / "subgroups.csv", ["column", "subgroup", "n", "positives", "metric", "value", "low", "high",
                                        "warning"],
             [["sex", "F", 2, 1, "auroc", 0.9, 0.5, 1.0, ""], ["sex", "M", 1, 0, "auroc", "", "", "", "too few <5"]])
    return root


def _page(run_dir: Path) -> tuple[str, Page]:
    text = write_html_report(run_dir).read_text(encoding="utf-8")
    return text, Page(text)


def test_sections_are_all_there_in_order(tmp_path):
    path = write_html_report(make_run(tmp_path / "run"))
    assert path == tmp_path / "run" / "report.html"
    page = Page(path.read_text(encoding="utf-8"))
    assert page.h2_ids == RUN_SECTIONS
    contents = [a["href"] for tag, a in page.tags if tag == "a" and (a.get("href") or "").startswith("#")]
    assert [f"#{s}" for s in RUN_SECTIONS] == contents[: len(RUN_SECTIONS)]
    assert any(tag == "h1" for tag, _ in page.tags)


def test_headline_gives_test_auroc_with_its_interval(tmp_path):
    text, _ = _page(make_run(tmp_path / "run"))
    assert "test AUROC 0.8750 (95% interval 0.612-0.990)" in text


def test_images_are_inline_pngs_one_per_figure_present(tmp_path):
    run = make_run(tmp_path / "run")
    _, page = _page(run)
    sources = [a.get("src") or "" for tag, a in page.tags if tag == "img"]
    shown = {"roc.png", "pr.png", "confusion_matrix.png", "reliability.png", "subgroups.png", "errors.png"}
    assert len(sources) == len([p for p in (run / "report").glob("*.png") if p.name in shown]) == 4
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)


def test_nothing_points_outside_the_file(tmp_path):
    text, page = _page(make_run(tmp_path / "run"))
    for tag, attrs in page.tags:
        assert tag not in ("link", "iframe", "object", "embed")
        assert not (tag == "script" and "src" in attrs)
        for name, value in attrs.items():
            assert not (value or "").strip().lower().startswith(("http:", "https:", "//")), (tag, name, value)
    assert "url(" not in text and "@import" not in text


def test_text_from_files_is_escaped(tmp_path):
    run = make_run(tmp_path / "run", card={"intended_use": "triage <b>only</b>"},
                   bad_reason="<script>alert(1)</script>")
    text, page = _page(run)
    tags = {tag for tag, _ in page.tags}
    assert "script" not in tags and "b" not in tags
    assert "triage &lt;b&gt;only&lt;/b&gt;" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "too few &lt;5" in text


def test_leakage_check_names_the_leaking_group(tmp_path):
    text, _ = _page(make_run(tmp_path / "leaky", leak=True))
    data = text.split('id="data"')[1].split('id="training"')[0]
    assert "failed" in data and "<li>P3 (train, test)</li>" in data
    assert "no patient/group is in two splits" not in data

    clean, _ = _page(make_run(tmp_path / "clean"))
    data = clean.split('id="data"')[1].split('id="training"')[0]
    assert "no patient/group is in two splits" in data and "failed" not in data


def test_split_by_image_when_there_are_no_groups(tmp_path):
    run = make_run(tmp_path / "run")
    _csv(run / "splits.csv", ["path", "frame", "label", "group", "split"],
         [[p, "", lab, "", s] for p, lab, _, s in SPLIT_ROWS])
    text, _ = _page(run)
    assert "split is by image (no groups given)" in text


def test_counts_per_class_and_split_match_splits_csv(tmp_path):
    _, page = _page(make_run(tmp_path / "run"))
    header, *rows = page.tables["data"][0]
    assert header == ["class", "train", "val", "test", "total"]
    expected = Counter((label, split) for _, label, _, split in SPLIT_ROWS)
    by_class = {r[0]: r[1:] for r in rows}
    for name in CLASSES:
        assert by_class[name] == [str(expected[(name, s)]) for s in ("train", "val", "test")] + \
            [str(sum(expected[(name, s)] for s in ("train", "val", "test")))]
    assert by_class["all images"] == ["4", "2", "3", "9"]


def test_patients_skipped_files_and_split_notes(tmp_path):
    text, page = _page(make_run(tmp_path / "run"))
    data = text.split('id="data"')[1].split('id="training"')[0]
    assert "train: 3, val: 2, test: 2" in data  # P1-P3; P4, P5; P6, P7
    assert "split by patient: 7 patients, 9 images" in data
    assert ["a/broken.png", "cannot be read"] in page.tables["data"][1]


def test_results_tables(tmp_path):
    _, page = _page(make_run(tmp_path / "run"))
    metrics, per_class, points = page.tables["results"]
    assert ["auroc", "0.8750", "0.612-0.990", "patient bootstrap"] in metrics
    assert ["nll", "n/a", "n/a", ""] in metrics
    assert not any("/" in row[0] for row in metrics)  # per-class entries are in their own table
    assert per_class == [["class", "recall"], ["tumour", "1.0000"]]
    assert points[0][:3] == ["operating point", "threshold", "sensitivity"]
    assert points[1][:4] == ["run's threshold", "0.4200", "1.0000 (0.200-1.000)", "1.0000 (0.200-1.000)"]
    assert points[1][5] == "1.0000 (n/a)"  # an interval with a missing end


def test_missing_optional_files_are_said_not_crashed_on(tmp_path):
    run = make_run(tmp_path / "run", training=False, errors=False, operating=False, subgroups=False)
    (run / "bad_files.csv").unlink()
    (run / "summary.md").unlink()
    text, page = _page(run)
    assert page.h2_ids == RUN_SECTIONS
    assert "errors.png is not available" in text
    assert "training.json is not available" in text
    assert "Files skipped: not available" in text
    assert "No subgroups were configured" in text
    assert "Figures not available: pr.png, reliability.png." in text
    assert not any(t and t[0][:1] == ["operating point"] for t in page.tables["results"])
    assert len([a for tag, a in page.tags if tag == "img"]) == 2  # roc and confusion matrix only


def test_only_recipe_and_metrics_still_make_a_page(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: bare\n", encoding="utf-8")
    (run / "metrics.json").write_text(json.dumps({"val": {"accuracy": 0.5}}), encoding="utf-8")
    text, page = _page(run)
    assert page.h2_ids == RUN_SECTIONS
    assert "splits.csv is not available" in text
    assert "no test figures" in text
    assert "card:</code> section was empty" in text and "intended_use, population, limitations" in text


@pytest.mark.parametrize(("card", "status"), [
    ({"intended_use": "second reader for adult chest films", "limitations": "one hospital"}, "covered"),
    ({"limitations": "one hospital"}, "not covered"),
    (None, "not covered"),
])
def test_checklist_intended_use_follows_the_card(tmp_path, card, status):
    _, page = _page(make_run(tmp_path / "run", card=card))
    _, state, where, _ = page.rows_by_item["intended_use"]
    assert state == status and where == "Model card"
    assert len(page.rows_by_item) >= 12
    assert {r[1] for r in page.rows_by_item.values()} <= {"covered", "partly", "not covered"}


def test_checklist_follows_leakage_and_error_grid(tmp_path):
    _, leaky = _page(make_run(tmp_path / "leaky", leak=True, errors=False))
    _, clean = _page(make_run(tmp_path / "clean"))
    assert leaky.rows_by_item["patients"][1] == "not covered"
    assert clean.rows_by_item["patients"][1] == "covered"
    assert leaky.rows_by_item["explainability"][1] == "not covered"
    assert clean.rows_by_item["explainability"][1] == "covered"


def test_card_keys_become_headings(tmp_path):
    text, _ = _page(make_run(tmp_path / "run", card={"intended_use": "triage", "population": "adults"}))
    card = text.split('id="card"')[1].split('id="checklist"')[0]
    assert "<h3>Intended use</h3>" in card and "<h3>Population</h3>" in card and "adults" in card


def test_written_atomically_leaving_no_temporary(tmp_path):
    run = make_run(tmp_path / "run")
    before = {p.name for p in run.iterdir()}
    write_html_report(run)
    (run / "report.html").write_text("old", encoding="utf-8")
    write_html_report(run)  # replaces the old page
    assert {p.name for p in run.iterdir()} == before | {"report.html"}
    assert (run / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def _cv_dir(root: Path) -> Path:
    for k, auroc in enumerate((0.8, 0.9)):
        make_run(root / f"fold-{k}", test_auroc=auroc)
    cv = {
        "folds": [{"fold": 0, "val": {"auroc": 0.7}, "test": {"auroc": 0.8, "accuracy": 0.6}},
                  {"fold": 1, "val": {"auroc": 0.71}, "test": {"auroc": 0.9, "accuracy": 0.65}}],
        "mean_sd": {"auroc": {"mean": 0.85, "sd": 0.0707}},
        "out_of_fold": {"auroc": _interval(0.84, 0.7, 0.95)},
        "ensemble_test": {"auroc": _interval(0.91, 0.8, 0.99)},
        "best_fold": {"fold": 1, "test": {"auroc": _interval(0.9, 0.78, 0.98)}},
        "leakage": {"ok": False, "problems": ["fold 1: patient <P3> in train and test"]},
    }
    (root / "cv.json").write_text(json.dumps(cv), encoding="utf-8")
    return root


def test_cv_report(tmp_path):
    cv_dir = _cv_dir(tmp_path / "cv")
    path = write_cv_report(cv_dir)
    assert path == cv_dir / "report.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.h2_ids == ["folds", "pooled", "ensemble", "leakage"]
    header, *rows = page.tables["folds"][0]
    assert header == ["split", "metric", "fold 0", "fold 1"]
    assert ["val", "auroc", "0.7000", "0.7100"] in rows
    assert ["test", "auroc", "0.8000", "0.9000"] in rows
    assert ["test", "accuracy", "0.6000", "0.6500"] in rows
    hrefs = {a.get("href") for tag, a in page.tags if tag == "a"}
    assert {"fold-0/report.html", "fold-1/report.html"} <= hrefs
    assert ["auroc", "0.8400", "0.700-0.950", "patient bootstrap"] in page.tables["pooled"][0]
    assert ["auroc", "0.8500 ± 0.0707"] in page.tables["pooled"][1]
    ensemble = page.tables["ensemble"][0]
    assert ensemble[0][3] == "best single fold (1)"
    assert ensemble[1] == ["auroc", "0.9100", "0.800-0.990", "0.9000", "0.780-0.980"]
    assert "patient &lt;P3&gt; in train and test" in text
    assert not any(tag in ("link", "script") for tag, _ in page.tags)
    assert not [p for p in cv_dir.iterdir() if p.name.endswith(".tmp")]


def test_cv_report_without_cv_json_reads_the_folds(tmp_path):
    root = tmp_path / "cv"
    for k, auroc in enumerate((0.8, 0.9)):
        make_run(root / f"fold-{k}", test_auroc=auroc)
    page = Page(write_cv_report(root).read_text(encoding="utf-8"))
    header, *rows = page.tables["folds"][0]
    assert header[2:] == ["fold 0", "fold 1"]
    assert ["test", "auroc", "0.8000", "0.9000"] in rows
    assert page.h2_ids == ["folds", "pooled", "ensemble", "leakage"]


def test_training_facts_and_recipe(tmp_path):
    text, page = _page(make_run(tmp_path / "run", card={"limitations": "a & b"}))
    facts = page.tables["training"][0]
    assert ["architecture", "efficientnet_b0"] in facts and ["initial weights", "imagenet (timm)"] in facts
    assert ["epochs trained", "3"] in facts and ["training time", "2 min 05 s"] in facts
    assert ["versions", "effft 0.1.0; torch 2.5.1; lightning 2.6.0"] in facts
    recipe = text.split("<pre>")[1].split("</pre>")[0]
    assert "arch: efficientnet_b0" in recipe and "limitations: a &amp; b" in recipe
    assert "sample of 12: median width 64 px (from 40 to 96), height 48 px (from 30 to 50)" in text
    bare, _ = _page(make_run(tmp_path / "bare", training=False))
    assert "Image sizes were not recorded." in bare


def _browser() -> str | None:
    import shutil

    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None, reason="needs chromium (or google-chrome) to render the page")
def test_a_headless_browser_renders_the_page_with_content(tmp_path):
    import subprocess

    import numpy as np

    run_dir = make_run(tmp_path / "run")
    page = write_html_report(run_dir)
    shot = tmp_path / "shot.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,1400", page.as_uri()], capture_output=True, timeout=120, check=True)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"))
    # text and figures: far from one flat colour
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005
