"""effft export --format onnx-int8: a quantised file, its agreement with fp32 measured on the test
split (recomputed here with ONNX Runtime on the same images), unreadable calibration images
skipped and named, and the user errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from effft.cli import run as cli

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": 0, "green": 1, "blue": 2}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A Lite0 run fitted for four epochs on 32 px images whose dominant channel is the class."""
    work = tmp_path_factory.mktemp("int8")
    rng = np.random.default_rng(0)
    for name, channel in COLOURS.items():
        (work / "data" / name).mkdir(parents=True)
        for i in range(10):
            a = rng.integers(0, 100, (32, 32, 3))
            a[..., channel] += 150
            Image.fromarray(a.astype(np.uint8)).save(work / "data" / name / f"{i:02d}.png")
    recipe = {
        "name": "r", "seed": 1, "output_dir": str(work / "runs"),
        "model": {"arch": "efficientnet_lite0", "pretrained": False},
        "data": {"adapter": "folder", "root": str(work / "data"), "image_size": 32, "batch_size": 4,
                 "num_workers": 0, "split": {"train": 0.5, "val": 0.2, "test": 0.3}},
        "optimizer": {"lr": 0.01}, "trainer": {"max_epochs": 4, "accelerator": "cpu"},
    }
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli(["-q", "fit", str(work / "r.yaml")]) == 0
    run = work / "runs" / "r"
    spread_classifier(run / "checkpoints" / "best.ckpt", prepared(run, split_rows(run, "train")))
    return run


def spread_classifier(ckpt: Path, images: np.ndarray) -> None:
    """Four epochs from scratch on 14 images may still predict one class everywhere (they did
    with one torch thread): the classifier is redrawn so that its logits vary by order 1 over
    the train images' pooled features, and the predictions with them."""
    from effft.infer.loaded_run import load_run

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = load_run(ckpt).model.eval()
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(images)).mean((2, 3))
    gen = torch.Generator().manual_seed(0)
    spread = feats.std(0).clamp_min(float(feats.std(0).mean()))  # dead features do not blow the logits up
    weight = 2 * torch.randn(model.classifier.weight.shape, generator=gen) / (spread * feats.shape[1] ** 0.5)
    state["state_dict"]["model.classifier.weight"] = weight
    state["state_dict"]["model.classifier.bias"] = -weight @ feats.mean(0)
    torch.save(state, ckpt)


def split_rows(run: Path, split: str) -> list[dict[str, str]]:
    with open(run / "splits.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def prepared(run: Path, rows: list[dict[str, str]]) -> np.ndarray:
    """The test images prepared as the run's preprocessing JSON says (resize, crop, normalise)."""
    from effft.infer.loaded_run import load_run
    from effft.data.transforms import apply

    loaded = load_run(run)
    pipeline = loaded.eval_pipeline()
    return torch.stack([apply(pipeline, np.asarray(Image.open(r["path"]).convert("RGB")), 3) for r in rows]).numpy()


def test_int8_file_is_quantised_and_its_agreement_is_what_onnxruntime_gives(fitted: Path, tmp_path: Path,
                                                                            capsys) -> None:
    import onnx
    import onnxruntime as ort

    out = tmp_path / "m.int8.onnx"
    assert cli(["-q", "export", str(fitted), "--format", "onnx-int8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli(["export", str(fitted), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    # torch's ONNX exporter logs its graph passes at INFO; a user sees only effft's lines
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "max abs difference" in said and "INFO" not in said and "unused" not in said
    assert {p.name for p in tmp_path.iterdir()} == {"m.int8.onnx", "m.int8.preprocessing.json", "m.int8.check.json",
                                                    "m.onnx", "m.preprocessing.json"}
    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) >= 40  # the convolutions' weights are stored as int8

    check = json.loads((tmp_path / "m.int8.check.json").read_text())
    rows = split_rows(fitted, "test")
    classes = json.loads((fitted / "classes.json").read_text())["classes"]
    truth = np.array([classes.index(r["label"]) for r in rows])
    x = prepared(fitted, rows)
    fp32 = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x})[0].argmax(1)
    int8 = ort.InferenceSession(str(out)).run(None, {"input": x})[0].argmax(1)
    assert check["split"] == "test" and check["images"] == len(rows) == 9
    assert check["agreement"] == pytest.approx((fp32 == int8).mean())
    assert check["accuracy_fp32"] == pytest.approx((fp32 == truth).mean())
    assert check["accuracy_int8"] == pytest.approx((int8 == truth).mean())
    assert len(set(fp32)) > 1  # a model that tells the classes apart, so that agreement could fail
    assert check["calibration_images"] == len(split_rows(fitted, "train")) and check["skipped"] == []
    assert check["pixel_range"] >= 150  # the generated images span most of 0-255
    assert check["batch_size"] == 16
    speeds = check["images_per_s"]
    assert set(speeds) == {"timm_eager_fp32", "onnxruntime_fp32", "onnxruntime_int8"} and min(speeds.values()) > 0
    assert check["speedup_vs_timm"]["onnxruntime_int8"] == pytest.approx(
        speeds["onnxruntime_int8"] / speeds["timm_eager_fp32"])
    # the int8 file is a working model: its logits follow the fp32 ones
    l32 = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x})[0]
    l8 = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    assert np.corrcoef(l32.ravel(), l8.ravel())[0, 1] > 0.9


def test_an_unreadable_calibration_image_is_skipped_and_named(fitted: Path, tmp_path: Path, capsys) -> None:
    import shutil

    run = tmp_path / "runs" / "r"
    shutil.copytree(fitted, run)
    data = tmp_path / "data"
    shutil.copytree(Path(split_rows(fitted, "train")[0]["path"]).parents[1], data)
    with open(run / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # the copied run reads the copied data
        r["path"] = str(data / Path(r["path"]).parent.name / Path(r["path"]).name)
    with open(run / "splits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ckpt = run / "checkpoints" / "best.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["effft"]["recipe"]["data"]["root"] = str(data)
    torch.save(state, ckpt)
    broken = next(r["path"] for r in rows if r["split"] == "train")
    Path(broken).write_bytes(b"not an image at all")

    out = tmp_path / "m.int8.onnx"
    assert cli(["export", str(ckpt), "--format", "onnx-int8", "--out", str(out)]) == 0
    err = "".join(capsys.readouterr().err.split())  # the console wraps long paths
    assert "skippedanunreadabletrainimage:" + broken in err and "Traceback" not in err
    check = json.loads((tmp_path / "m.int8.check.json").read_text())
    assert [s["path"] for s in check["skipped"]] == [broken] and check["skipped"][0]["split"] == "train"
    assert check["calibration_images"] == sum(r["split"] == "train" for r in rows) - 1


def test_the_calibration_count_is_a_seeded_sample(fitted: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.int8.onnx"
    assert cli(["-q", "export", str(fitted), "--format", "onnx-int8", "--out", str(out),
                "--calibration-images", "4"]) == 0
    assert json.loads((tmp_path / "m.int8.check.json").read_text())["calibration_images"] == 4


@pytest.mark.parametrize("args,said", [
    (["--format", "onnx-int8", "--calibration-images", "0"], "--calibration-images must be at least 1, got 0"),
    (["--format", "onnx", "--calibration-images", "8"], "--calibration-images is for --format onnx-int8"),
    (["--format", "timm", "--calibration-images", "8"], "--calibration-images is for --format onnx-int8"),
])
def test_calibration_flag_errors(fitted: Path, tmp_path: Path, capsys, args: list[str], said: str) -> None:
    out = tmp_path / "x"
    assert cli(["export", str(fitted), *args, "--out", str(out)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert said in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_loose_checkpoint_has_no_split_to_calibrate_on(fitted: Path, tmp_path: Path, capsys) -> None:
    import shutil

    loose = tmp_path / "loose.ckpt"
    shutil.copy(fitted / "checkpoints" / "best.ckpt", loose)
    assert cli(["export", str(loose), "--format", "onnx-int8"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "splits.csv" in err and "is not there" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["loose.ckpt"]


@pytest.mark.parametrize("pixel_range,named", [(2.0, True), (180.0, False)])
def test_low_agreement_is_a_warning_that_names_faint_images(tmp_path: Path, caplog, pixel_range: float,
                                                            named: bool) -> None:
    from effft.infer.quantize import Int8Check, report

    check = Int8Check(split="test", images=26, agreement=16 / 26, accuracy_fp32=0.88, accuracy_int8=0.73,
                      images_per_s={"timm_eager_fp32": 10.0, "onnxruntime_fp32": 20.0, "onnxruntime_int8": 30.0},
                      speedup_vs_timm={"onnxruntime_fp32": 2.0, "onnxruntime_int8": 3.0}, calibration_images=200,
                      pixel_range=pixel_range)
    report(check, tmp_path / "m.int8.onnx")
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "only 61.5% of the test images" in warned and "deploy the fp32 file" in warned
    assert ("a median of only 2 pixel values" in warned) is named
    assert json.loads((tmp_path / "m.int8.check.json").read_text())["pixel_range"] == pixel_range


@pytest.mark.parametrize("sizes", [[32, 8], [9], [3, 3]])
def test_the_speed_batch_holds_sixteen_images_in_split_order(sizes: list[int]) -> None:
    from effft.infer.quantize import SPEED_BATCH, speed_batch

    batches, start = [], 0
    for size in sizes:
        batches.append(np.arange(start, start + size, dtype=np.float32)[:, None])
        start += size
    got = speed_batch(batches)[:, 0]
    total = sum(sizes)
    assert SPEED_BATCH == 16 and len(got) == 16
    assert got.tolist() == [i % total for i in range(16)]  # the first 16, or the split repeated
