"""The ready recipes in recipes/: each validates, asks for pretrained weights, says in its header
how to use it, and runs one short epoch end to end on small generated data (offline: random
initialisation, a few 32-64 px batches on the CPU)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from effft.cli import run
from effft.config.load import load_recipe
from effft.infer.loaded_run import load_run
from effft.infer.predict import predict_paths

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
READY = [p for p in RECIPES if p.name != "quickstart.yaml"]

# shrinks any recipe to one short CPU epoch that needs no downloaded weights
SMALL = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
         "trainer.limit_test_batches=2", "trainer.accelerator=cpu", "trainer.devices=1",
         "data.batch_size=4", "data.num_workers=0", "model.pretrained=false",
         # quoted: unquoted, YAML reads off as false, which data.cache refuses
         "data.cache='off'"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fit(recipe: str, tmp_path: Path, data_root: Path, *extra: str) -> dict:
    out = tmp_path / "runs"
    sets = [*SMALL, f"data.root={data_root}", f"output_dir={out}", *extra]
    argv = ["-q", "fit", str(ROOT / "recipes" / recipe)]
    for s in sets:
        argv += ["--set", s]
    assert run(argv) == 0
    name = load_recipe(ROOT / "recipes" / recipe, [f"data.root={data_root}"]).name
    metrics = json.loads((out / name / "metrics.json").read_text())
    assert metrics["val"], metrics
    return metrics


# ---------------------------------------------------------------------------- generated data


def _class_folders(root: Path, classes=("cat", "dog"), per_class: int = 10, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.full((size, size, 3), 60 + 120 * c, np.uint8)
            noise = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(root / name / f"{i}.jpg")
    return root


def _medmnist(path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        labels = np.arange(n) % 2
        images = (rng.integers(0, 80, (n, 28, 28)) + 120 * labels[:, None, None]).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


def _dicom_folders(root: Path) -> Path:
    """pydicom's MR and CT test files, copied into two class folders as 12 patients."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    for c, (name, source) in enumerate((("normal", "MR_small.dcm"), ("abnormal", "CT_small.dcm"))):
        (root / name).mkdir(parents=True)
        for patient in range(6):
            for image in range(2):
                ds = pydicom.dcmread(get_testdata_file(source))
                ds.PatientID = f"P{c}{patient}"
                ds.save_as(root / name / f"p{patient}_{image}.dcm")
    return root


def _chestxray14(root: Path) -> Path:
    """A tiny NIH-style download: images_001/images/*.png and Data_Entry_2017.csv."""
    images = root / "images_001" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age"])
        for patient in range(1, 11):
            # every patient has a positive and a negative of each finding, so any split of
            # patients gives each label both classes (per-label AUROC is defined)
            third = "No Finding" if patient % 2 else "Effusion|Mass"
            for k, finding in enumerate(["Effusion", "Mass", third]):
                name = f"{patient:08d}_{k:03d}.png"
                Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(images / name)
                writer.writerow([name, finding, k, patient, 50])
        writer.writerow(["99999999_000.png", "Mass", 0, 99999, 50])  # listed, not downloaded
    return root


# ---------------------------------------------------------------------------- the recipes themselves


def test_every_recipe_is_here():
    assert {p.name for p in READY} == {"folder_b0.yaml", "medmnist_b0.yaml", "dicom_b0.yaml",
                                       "chest_multilabel_b0.yaml", "face_b0.yaml", "face_embedding_b0.yaml",
                                       "ddp_b3.yaml"}


@pytest.mark.parametrize("head", ["softmax", "cosface"])
def test_face_embedding_recipe_takes_the_other_heads_as_its_comments_say(head: str, tmp_path: Path):
    # the classifier baseline its comments give: --set model.head.type=softmax, nothing else
    recipe = load_recipe(ROOT / "recipes" / "face_embedding_b0.yaml", [f"data.root={tmp_path}",
                                                                        f"model.head.type={head}"])
    assert recipe.model.head.type == head


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path: Path, tmp_path: Path):
    recipe = load_recipe(path, [f"data.root={tmp_path}"])
    assert recipe.name == path.stem
    raw = yaml.safe_load(path.read_text())
    assert "data" in raw and "model" in raw


@pytest.mark.parametrize("path", READY, ids=lambda p: p.name)
def test_ready_recipe_asks_for_pretrained_weights_and_says_how_to_run(path: Path, tmp_path: Path):
    raw = yaml.safe_load(path.read_text())
    assert "allow_random_init" not in raw["model"]
    recipe = load_recipe(path, [f"data.root={tmp_path}"])
    assert recipe.model.pretrained is True or isinstance(recipe.model.pretrained, str)
    assert not recipe.model.allow_random_init
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert path.read_text().startswith("#") and f"effft fit recipes/{path.name}" in text
    assert "layout" in text.lower()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_custom_crops_match_image_size(path: Path, tmp_path: Path):
    """A train list with its own crop size must agree with data.image_size (eval uses the latter)."""
    recipe = load_recipe(path, [f"data.root={tmp_path}"])
    for entry in recipe.data.augment.train or []:
        (name, args), = entry.items()
        if "size" in args:
            assert list(args["size"]) == [recipe.data.image_size] * 2, (name, args)


def test_recipes_say_what_the_brief_asks(tmp_path: Path):
    def load(name):
        return load_recipe(ROOT / "recipes" / name, [f"data.root={tmp_path}"])

    med = load("medmnist_b0.yaml")
    assert med.model.in_chans == 1 and med.metrics.threshold.method == "youden"
    assert med.monitor.metric == "val/loss" and med.data.image_size in (64, 96)
    dicom = load("dicom_b0.yaml")
    assert dicom.model.in_chans == 1 and dicom.data.split.group and dicom.data.dicom.group_by_patient
    assert dicom.data.dicom.window_center is None and dicom.metrics.threshold.target == 0.9
    chest = load("chest_multilabel_b0.yaml")
    assert chest.data.csv.label_separator == "|" and chest.data.csv.negative_label == "No Finding"
    assert chest.loss.pos_weight and chest.monitor.metric == "val/auroc"
    face = load("face_b0.yaml")
    assert face.data.face.detect and face.data.face.margin > 0
    ddp = load("ddp_b3.yaml")
    assert ddp.model.arch == "efficientnet_b3" and ddp.model.sync_batchnorm and ddp.model.channels_last
    assert ddp.trainer == {**ddp.trainer, "accelerator": "gpu", "devices": 4, "strategy": "ddp",
                           "precision": "bf16-mixed"}
    assert ddp.data.cache == "disk" and ddp.data.image_size is None  # the weights' resolution


# ---------------------------------------------------------------------------- one short epoch each


def test_folder_recipe_info_and_fit(tmp_path: Path, capsys):
    data = _class_folders(tmp_path / "images")
    assert run(["-q", "info", str(ROOT / "recipes" / "folder_b0.yaml"), "--set", f"data.root={data}",
                "--set", "model.pretrained=false"]) == 0
    assert "cat" in capsys.readouterr().out
    metrics = _fit("folder_b0.yaml", tmp_path, data, "data.image_size=32")
    assert "accuracy" in metrics["val"]


def test_medmnist_recipe_fits(tmp_path: Path):
    npz = _medmnist(tmp_path / "breastmnist.npz")
    # image_size stays 64: the recipe's own crops are 64 px
    metrics = _fit("medmnist_b0.yaml", tmp_path, tmp_path)
    assert "auroc" in metrics["val"] and "threshold" in metrics["val"]
    assert npz.exists()
    # sensitivity is that of cancer found: malignant (label 0 of the file) is the positive class
    assert json.loads((tmp_path / "runs" / "medmnist_b0" / "classes.json").read_text())["classes"][1] == "malignant"


def test_dicom_recipe_fits_with_patient_groups(tmp_path: Path):
    data = _dicom_folders(tmp_path / "dicom")
    metrics = _fit("dicom_b0.yaml", tmp_path, data, "data.image_size=32", "data.augment.train=default")
    assert "auroc" in metrics["val"]
    with open(tmp_path / "runs" / "dicom_b0" / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    split_of: dict[str, set] = {}
    for row in rows:
        # the group is the PatientID written into the file: P<class><patient>
        patient = Path(row["path"]).parent.name[0] + Path(row["path"]).name.split("_")[0]
        assert row["group"] == f"P{int(patient[0] == 'a')}{patient[2:]}"
        split_of.setdefault(row["group"], set()).add(row["split"])
    assert len(split_of) == 12 and all(len(s) == 1 for s in split_of.values())


def test_chest_recipe_fits_on_the_script_output(tmp_path: Path):
    data = _chestxray14(tmp_path / "chestxray14")
    assert _script("chestxray14").main([str(data)]) == 0
    with open(data / "chest14.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and rows[0]["Image Index"] == "images_001/images/00000001_000.png"
    # the whole val split: on a part of it a label may have only negatives
    metrics = _fit("chest_multilabel_b0.yaml", tmp_path, data, "data.image_size=32",
                   "data.augment.train=default", "trainer.limit_val_batches=1.0")
    assert metrics["val"]["auroc"] is not None and 0 <= metrics["val"]["auroc/Effusion"] <= 1


def test_face_recipe_fits_on_lfw_script_output(tmp_path: Path):
    skdata = pytest.importorskip("skimage.data")
    face = skdata.astronaut()
    lfw = tmp_path / "lfw-deepfunneled"
    for p, person in enumerate(["Ada_Lovelace", "Alan_Turing", "Grace_Hopper"]):
        (lfw / person).mkdir(parents=True)
        for i in range(6):
            crop = face[8 * i:8 * i + 320, 8 * i:8 * i + 320].astype(np.int16) + 20 * p
            Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize((160, 160)).save(
                lfw / person / f"{person}_{i:04d}.jpg")
    (lfw / "Only_Once").mkdir()
    Image.fromarray(face).save(lfw / "Only_Once" / "Only_Once_0001.jpg")
    assert _script("lfw").main([str(lfw), str(tmp_path / "faces"), "--min-images", "4"]) == 0
    metrics = _fit("face_b0.yaml", tmp_path, tmp_path / "faces", "data.image_size=32")
    assert "accuracy" in metrics["val"]
    # the trained run predicts new photos on the face crop, as it was trained
    recipe = load_recipe(ROOT / "recipes" / "face_b0.yaml", [f"data.root={tmp_path / 'faces'}"])
    loaded = load_run(tmp_path / "runs" / recipe.name)
    assert loaded.face is not None and loaded.face.margin == recipe.data.face.margin
    photos = sorted((tmp_path / "faces" / "Grace_Hopper").glob("*.jpg"))
    preds = predict_paths(loaded, photos, progress=False)
    assert preds.faces is not None and all(f is not None for f in preds.faces) and any(preds.faces)


def test_ddp_recipe_fits_on_one_cpu(tmp_path: Path):
    data = _class_folders(tmp_path / "images")
    # B0 instead of B3, one CPU process instead of 4 GPUs, full precision: the recipe's other
    # settings (sync BatchNorm, channels_last, EMA) stay as written
    metrics = _fit("ddp_b3.yaml", tmp_path, data, "model.arch=efficientnet_b0", "data.image_size=32",
                   "trainer.strategy=auto", "trainer.precision=32-true")
    assert "accuracy" in metrics["val"]


def test_medmnist_recipe_on_the_real_breastmnist(shared_data: Path, capsys):
    assert run(["-q", "info", str(ROOT / "recipes" / "medmnist_b0.yaml"), "--set", f"data.root={shared_data}",
                "--set", "model.pretrained=false"]) == 0
    out = capsys.readouterr().out
    assert "train (546)" in out and "malignant" in out and "input 64 px" in out
