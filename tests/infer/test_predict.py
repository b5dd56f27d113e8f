"""effft predict: bad files listed, TTA, and parity with the model applied to the eval pipeline."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effft.cli import run as cli
from effft.data.decode import read_image
from effft.data.transforms import apply, build_pipeline
from effft.errors import EffftError
from effft.model.registry import create_model
from effft.infer.loaded_run import load_run
from effft.infer.predict import predict, predict_paths, tta_views
from effft.input import InputSpec

SIZE = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def make_ckpt(path: Path, *, classes: list[str], task: str, threshold: float = 0.5, crop_pct: float = 0.875,
              name: str = "efficientnet_b0", image_size: int = SIZE, data: dict | None = None) -> torch.nn.Module:
    """A minimal effft checkpoint of a small random model whose logits are far from zero."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=len(classes)).eval()
    with torch.no_grad():  # a fresh model's features barely vary: scale the classifier to logits of order 1
        feats = model.forward_features(torch.randn(8, 3, image_size, image_size)).mean((2, 3))
        weight = torch.randn_like(model.classifier.weight) / (feats.std(0) * feats.shape[1] ** 0.5 + 1e-12)
        model.classifier.weight.copy_(weight * 2)
        model.classifier.bias.copy_(-(weight * 2) @ feats.mean(0))
    pre = InputSpec(size=224, crop_pct=crop_pct)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "effft": {"recipe": {"data": {"image_size": image_size, "augment": {"eval": "default"}, **(data or {})}},
                          "model_name": name, "in_chans": 3, "bn_eps": model.bn1.eps,
                          "preprocessing": pre.to_dict(), "classes": classes, "task": task,
                          "threshold": threshold}}, path)
    model.preprocessing = pre
    return model


def write_images(folder: Path, n: int, *, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def reference_probs(model: torch.nn.Module, paths: list[Path], *, task: str, crop_pct: float = 0.875) -> torch.Tensor:
    """The original model on the eval pipeline's tensors, outside effft.predict."""
    pipeline = build_pipeline(train=False, entries=None, spec=InputSpec(size=SIZE, crop_pct=crop_pct))
    x = torch.stack([apply(pipeline, read_image(p, channels=3), 3) for p in paths])
    with torch.no_grad():
        logits = model(x)
    return logits.sigmoid() if task == "multilabel" else logits.softmax(-1)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_with_corrupt_file_predicts_the_rest(tmp_path: Path) -> None:
    classes = ["cat", "dog", "eel", "fox"]
    model = make_ckpt(tmp_path / "run.ckpt", classes=classes, task="multiclass")
    good = write_images(tmp_path / "imgs", 2) + write_images(tmp_path / "imgs" / "sub", 1, seed=1)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.csv"
    assert cli(["-q", "predict", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(out),
                "--top-k", "2", "--batch-size", "2"]) == 0
    rows = {r["path"]: r for r in read_csv(out)}
    broken = str(tmp_path / "imgs" / "broken.jpg")
    assert set(rows) == {str(p) for p in good} | {broken}  # recursive; notes.txt is no image
    bad = rows[broken]
    assert bad["error"] and bad["label_1"] == "" and bad["prob_1"] == ""
    ref = reference_probs(model, good, task="multiclass")
    for path, probs in zip(good, ref):
        row = rows[str(path)]
        assert row["error"] == ""
        top = probs.topk(2)
        assert [row["label_1"], row["label_2"]] == [classes[i] for i in top.indices.tolist()]
        assert [float(row["prob_1"]), float(row["prob_2"])] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert "label_3" not in row


def test_predictions_equal_the_model_on_the_eval_pipeline(tmp_path: Path) -> None:
    model = make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    paths = write_images(tmp_path / "imgs", 3)
    preds = predict(tmp_path / "run.ckpt", paths, out=tmp_path / "p.csv", progress=False, batch_size=2, keep=True)
    assert preds.errors == [None, None, None]
    ref = reference_probs(model, paths, task="multiclass")
    assert ref.max() > 0.5  # the comparison means something: confident, unequal probabilities
    torch.testing.assert_close(preds.probs, ref, atol=1e-5, rtol=0)


def test_flip_tta_changes_nothing_for_a_mirror_symmetric_image(tmp_path: Path) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass", crop_pct=1.0)
    rng = np.random.default_rng(3)
    half = rng.integers(0, 256, (SIZE, SIZE // 2, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(tmp_path / "sym.png")
    asym = write_images(tmp_path / "asym", 1)[0]
    run = load_run(tmp_path / "run.ckpt")
    files = [tmp_path / "sym.png", asym]
    plain = predict_paths(run, files, tta="none", progress=False).probs
    flip = predict_paths(run, files, tta="flip", progress=False).probs
    torch.testing.assert_close(flip[0], plain[0], atol=1e-6, rtol=0)
    # flip TTA is the softmax of the mean logits of the image and its mirror (as the run's test with
    # metrics.tta: flip), which differs for an asymmetric image
    x = apply(run.eval_pipeline(), read_image(asym, channels=3), 3)[None]
    with torch.no_grad():
        want = ((run.model(x) + run.model(x.flip(-1))) / 2).softmax(-1)
    torch.testing.assert_close(flip[1:], want, atol=1e-6, rtol=0)
    assert (flip[1] - plain[1]).abs().max() > 1e-4


def test_multicrop_views_and_run(tmp_path: Path) -> None:
    batch = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    views = tta_views(batch, tta="multicrop", size=8)
    assert len(views) == 6 and all(v.shape == (2, 3, 8, 8) for v in views)
    torch.testing.assert_close(views[0], batch[..., 1:9, 2:10])
    torch.testing.assert_close(views[1], views[0].flip(-1))
    torch.testing.assert_close(views[-1], batch[..., 2:, 4:])
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    preds = predict(tmp_path / "run.ckpt", write_images(tmp_path / "imgs", 2), out=tmp_path / "p.csv",
                    tta="multicrop", progress=False, keep=True)
    torch.testing.assert_close(preds.probs.sum(1), torch.ones(2))


def test_binary_and_multilabel_columns(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "imgs", 3)
    model = make_ckpt(tmp_path / "bin.ckpt", classes=["healthy", "sick"], task="binary", threshold=0.0)
    predict(tmp_path / "bin.ckpt", paths, out=tmp_path / "bin.csv", progress=False)
    ref = reference_probs(model, paths, task="binary")
    rows = read_csv(tmp_path / "bin.csv")
    assert [r["label"] for r in rows] == ["sick"] * 3  # threshold 0: every image is positive
    assert [float(r["prob_sick"]) for r in rows] == pytest.approx(ref[:, 1].tolist(), abs=1e-5)

    classes = ["l0", "l1", "l2", "l3", "l4"]
    model = make_ckpt(tmp_path / "ml.ckpt", classes=classes, task="multilabel")
    predict(tmp_path / "ml.ckpt", paths, out=tmp_path / "ml.csv", progress=False)
    ref = reference_probs(model, paths, task="multilabel")
    for row, probs in zip(read_csv(tmp_path / "ml.csv"), ref):
        on = [i for i in probs.argsort(descending=True).tolist() if probs[i] >= 0.5]
        assert (row["labels"].split(";") if row["labels"] else []) == [classes[i] for i in on]
        got = [float(p) for p in row["probs"].split(";")] if row["probs"] else []
        assert got == pytest.approx([float(probs[i]) for i in on], abs=1e-5)


def test_no_images_is_an_error_naming_the_paths(tmp_path: Path) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EffftError, match="empty"):
        predict(tmp_path / "run.ckpt", [tmp_path / "empty"], out=tmp_path / "p.csv", progress=False)
    with pytest.raises(EffftError, match="missing.png does not exist"):
        predict(tmp_path / "run.ckpt", [tmp_path / "missing.png"], out=tmp_path / "p.csv", progress=False)
    assert cli(["-q", "predict", str(tmp_path / "run.ckpt"), str(tmp_path / "empty"), "--out",
                str(tmp_path / "p.csv")]) != 0
    assert not (tmp_path / "p.csv").exists()


def test_face_runs_predict_the_face_crop_the_adapter_trained_on(tmp_path: Path) -> None:
    from skimage import data as skdata

    from effft.data.sources import face

    people = tmp_path / "people"
    for person in ("eileen", "nobody"):
        (people / person).mkdir(parents=True)
    canvas = np.full((612, 662, 3), 255, np.uint8)
    canvas[100:, 150:] = skdata.astronaut()
    Image.fromarray(canvas).save(people / "eileen" / "shifted.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
        people / "nobody" / "noise.png")
    options = {"margin": 0.3, "min_size": 40}
    model = make_ckpt(tmp_path / "run.ckpt", classes=["eileen", "nobody"], task="multiclass",
                      data={"adapter": "face", "root": str(people), "face": options})
    # the reference: what the face adapter hands to training, through the eval pipeline
    source = face.load(people, face.Options(**options), channels=3)
    assert sum(box is not None for box in source.boxes.values()) == 1
    pipeline = build_pipeline(train=False, entries=None, spec=replace(model.preprocessing, size=SIZE))
    items = sorted(source.items, key=lambda i: Path(i.path).name)
    x = torch.stack([apply(pipeline, source.read(i, 3), 3) for i in items])
    with torch.no_grad():
        want = model(x).softmax(-1)
    files = [Path(i.path) for i in items]  # noise.png, shifted.png
    out = tmp_path / "p.csv"
    assert cli(["-q", "predict", str(tmp_path / "run.ckpt"), *map(str, files), "--out", str(out)]) == 0
    rows = read_csv(out)
    assert [r["face"] for r in rows] == ["no", "yes"]
    got = torch.tensor([[float(r["prob_1"]) if r["label_1"] == c else float(r["prob_2"]) for c in ("eileen", "nobody")]
                        for r in rows])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the whole shifted photo gives another answer: the crop is what made them equal
    whole = apply(pipeline, read_image(files[1], channels=3), 3)[None]
    with torch.no_grad():
        assert (model(whole).softmax(-1)[0] - want[1]).abs().max() > 1e-3
    # a run trained on whole photos (detect: false) predicts whole photos and has no face column
    make_ckpt(tmp_path / "whole.ckpt", classes=["eileen", "nobody"], task="multiclass",
              data={"adapter": "face", "root": str(people), "face": {"detect": False}})
    preds = predict(tmp_path / "whole.ckpt", files[1:], out=tmp_path / "w.csv", progress=False, keep=True)
    assert preds.faces is None and "face" not in read_csv(tmp_path / "w.csv")[0]
    with torch.no_grad():
        torch.testing.assert_close(preds.probs, model(whole).softmax(-1), atol=1e-5, rtol=0)


def test_out_that_is_a_folder_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    images = write_images(tmp_path / "imgs", 1)
    assert cli(["predict", str(tmp_path / "run.ckpt"), str(images[0]), "--out", str(tmp_path / "imgs")]) == 1
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'imgs'} is a folder" in err and "predictions.csv" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["img0.png"]  # nothing written there
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder is wanted")
    assert cli(["predict", str(tmp_path / "run.ckpt"), str(images[0]), "--out", str(blocker / "p.csv")]) == 1
    assert "cannot be made" in capsys.readouterr().err


def test_predict_with_onnxruntime_gives_the_top_1_of_pytorch(tmp_path: Path) -> None:
    from effft.infer.export import export

    model = make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    paths = write_images(tmp_path / "imgs", 5)
    export(tmp_path / "run.ckpt", fmt="onnx", out=tmp_path / "m.onnx")
    ours = predict(tmp_path / "run.ckpt", paths, out=tmp_path / "torch.csv", progress=False, batch_size=2, keep=True)
    assert cli(["-q", "predict", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(tmp_path / "ort.csv"),
                "--engine", "onnxruntime", "--onnx", str(tmp_path / "m.onnx"), "--workers", "2",
                "--batch-size", "2"]) == 0
    by_path = {Path(r["path"]).name: r for r in read_csv(tmp_path / "ort.csv")}
    torch_rows = {Path(r["path"]).name: r for r in read_csv(tmp_path / "torch.csv")}
    assert set(by_path) == {p.name for p in paths}
    for name, row in by_path.items():
        assert row["label_1"] == torch_rows[name]["label_1"]
        assert float(row["prob_1"]) == pytest.approx(float(torch_rows[name]["prob_1"]), abs=1e-4)
    torch.testing.assert_close(ours.probs, reference_probs(model, paths, task="multiclass"), atol=1e-5, rtol=0)


def test_onnxruntime_without_an_export_says_how_to_make_one(tmp_path: Path, capsys) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b"], task="binary")
    write_images(tmp_path / "imgs", 1)
    assert cli(["predict", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(tmp_path / "p.csv"),
                "--engine", "onnxruntime", "--onnx", str(tmp_path / "none.onnx")]) == 1
    err = capsys.readouterr().err
    assert "none.onnx does not exist" in err and "--format onnx" in err
    assert not (tmp_path / "p.csv").exists()
