"""`effft cv`: every non-test image predicted once by a fold that never saw it, no patient in two
splits of a fold, finished folds kept when the command is given again (also after a kill -9)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from effft.cli import run


def _patients(root: Path, patients: int = 15, per_patient: int = 3) -> Path:
    """Images of patients, each patient's images of one class; a CSV with a patient column."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "patient"])
        for p in range(patients):
            label = ["benign", "malignant"][p % 2]
            for k in range(per_patient):
                colour = np.array([200, 60, 60] if label == "malignant" else [60, 60, 200])
                a = np.clip(rng.normal(colour, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                name = f"images/p{p}_{k}.png"
                Image.fromarray(a).save(root / name)
                w.writerow([name, label, f"P{p}"])
    return root


def _recipe(tmp_path: Path, epochs: int = 1) -> Path:
    data = tmp_path / "data" if (tmp_path / "data").exists() else _patients(tmp_path / "data")
    recipe = {"name": "cv", "output_dir": str(tmp_path / "runs"), "model": {"arch": "efficientnet_b0", "pretrained": False},
              "data": {"adapter": "csv", "root": str(data), "csv": {"file": "labels.csv", "group_column": "patient"},
                       "image_size": 32, "batch_size": 8, "split": {"train": 0.7, "val": 0.1, "test": 0.2}},
              "report": {"error_grid": 0}, "loggers": [], "trainer": {"max_epochs": epochs}}
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_cv_predicts_every_non_test_image_once_and_keeps_patients_whole(tmp_path, capsys):
    assert run(["-q", "cv", str(_recipe(tmp_path)), "--folds", "3"]) == 0
    root = tmp_path / "runs" / "cv"
    folds = [_rows(root / f"fold-{k}" / "splits.csv") for k in range(3)]
    test = {r["path"] for r in folds[0] if r["split"] == "test"}
    everyone = {r["path"] for r in folds[0]}
    assert all({r["path"] for r in f if r["split"] == "test"} == test for f in folds)  # one shared test split
    oof = _rows(root / "oof_predictions.csv")
    predicted = [r["path"] for r in oof]
    assert len(predicted) == len(set(predicted)) and set(predicted) == everyone - test  # each once
    for k, rows in enumerate(folds):
        held = {r["path"] for r in rows if r["split"] == "unused"}
        assert held == {r["path"] for r in oof if r["fold"] == str(k)}  # predicted by the fold that left it out
        where: dict[str, set[str]] = {}
        for r in rows:
            where.setdefault(r["group"], set()).add(r["split"])
        assert all(len(s) == 1 for s in where.values()), k  # no patient in two of train/val/test/held out
    result = json.loads((root / "cv.json").read_text())
    assert result["leakage"] == {"ok": True, "grouped": True, "problems": []}
    assert len(result["folds"]) == 3 and set(result["mean_sd"]) >= {"auroc", "accuracy"}
    pooled = result["out_of_fold"]["accuracy"]
    right = [(r["target"] == ("malignant" if float(r["prob_malignant"]) >= 0.5 else "benign")) for r in oof]
    assert pooled["low"] <= pooled["value"] <= pooled["high"]
    assert 0 <= pooled["value"] <= 1 and len(right) == len(oof)
    # the ensemble: the mean of the folds' calibrated test probabilities
    tests = [{r["path"]: float(r["prob_malignant"]) for r in _rows(root / f"fold-{k}" / "report" / "predictions.csv")}
             for k in range(3)]
    assert set(tests[0]) == test
    from sklearn.metrics import roc_auc_score

    y = {r["path"]: r["target"] == "malignant" for r in _rows(root / "fold-0" / "report" / "predictions.csv")}
    paths = sorted(test)
    mean = [np.mean([t[p] for t in tests]) for p in paths]
    assert result["ensemble_test"]["auroc"]["value"] == pytest.approx(roc_auc_score([y[p] for p in paths], mean),
                                                                        abs=1e-5)
    assert result["best_fold"]["fold"] in (0, 1, 2)
    assert (root / "report.html").read_text().count('href="fold-') >= 3
    out = capsys.readouterr().out
    assert "cross-validation, 3 folds" in out and "no patient is in two splits" in out  # the result, also under -q

    # given again, nothing is trained again
    stamps = {k: os.path.getmtime(root / f"fold-{k}" / "checkpoints" / "best.ckpt") for k in range(3)}
    assert run(["cv", str(_recipe(tmp_path)), "--folds", "3"]) == 0
    assert "finished before, kept" in capsys.readouterr().out
    assert stamps == {k: os.path.getmtime(root / f"fold-{k}" / "checkpoints" / "best.ckpt") for k in range(3)}


@pytest.mark.slow
def test_cv_under_ddp_trains_each_fold_on_two_processes_and_pools_once(tmp_path):
    """Every process runs the folds (Lightning starts the second one as a copy of the command), so
    the first alone may speak and write, and none may read a fold before it is written."""
    path = _recipe(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["trainer"].update(accelerator="cpu", devices=2, strategy="ddp")
    path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-m", "effft.cli", "-q", "cv", str(path), "--folds", "3"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "sync_dist" not in result.stderr
    assert all(result.stdout.count(f"fold {k} of cv: training") == 1 for k in range(3)), result.stdout
    assert result.stdout.count("cross-validation, 3 folds") == 1
    root = tmp_path / "runs" / "cv"
    rows = _rows(root / "fold-0" / "splits.csv")
    oof = [r["path"] for r in _rows(root / "oof_predictions.csv")]
    assert len(oof) == len(set(oof)) and set(oof) == {r["path"] for r in rows if r["split"] != "test"}
    assert len(json.loads((root / "cv.json").read_text())["folds"]) == 3


def test_cv_needs_three_folds(tmp_path, capsys):
    assert run(["cv", str(_recipe(tmp_path)), "--folds", "2"]) == 2
    assert "at least 3" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cv_killed_in_its_second_fold_finishes_without_redoing_the_first(tmp_path):
    recipe = _recipe(tmp_path, epochs=8)
    root = tmp_path / "runs" / "cv"
    command = [sys.executable, "-m", "effft.cli", "-q", "cv", str(recipe), "--folds", "3"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (root / "fold-1" / "checkpoints" / "last.ckpt").exists():  # fold 2 of 3 is under way
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = os.path.getmtime(root / "fold-0" / "checkpoints" / "best.ckpt")
    assert not (root / "fold-1" / "metrics.json").exists()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.getmtime(root / "fold-0" / "checkpoints" / "best.ckpt") == first
    assert all((root / f"fold-{k}" / "metrics.json").exists() for k in range(3))
    assert (root / "cv.json").exists()
