"""The scripts in datasets/, each run on tiny generated inputs; their outputs load with the
adapter they are made for."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from effft.data.sources import folder, medmnist, table

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["medmnist_check", "chestxray14", "isic", "lfw", "check_folder"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png(path: Path, value: int = 100, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def test_no_package_and_a_readme_section_per_script():
    assert not (ROOT / "datasets" / "__init__.py").exists()
    readme = (ROOT / "datasets" / "README.md").read_text()
    for name in SCRIPTS:
        assert f"## {name}.py" in readme


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name: str):
    out = subprocess.run([sys.executable, str(ROOT / "datasets" / f"{name}.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage:")


def test_medmnist_check_and_to_folder(tmp_path: Path, capsys):
    labels = {"train": [0, 1, 1, 0, 1], "val": [0, 1], "test": [1, 0, 0]}
    arrays = {}
    for split, lab in labels.items():
        arrays[f"{split}_images"] = np.arange(len(lab) * 28 * 28, dtype=np.uint8).reshape(-1, 28, 28)
        arrays[f"{split}_labels"] = np.array(lab, np.uint8)[:, None]
    npz = tmp_path / "toymnist.npz"
    np.savez(npz, **arrays)
    assert _script("medmnist_check").main([str(npz), "--to-folder", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert "train: 5 images of 28x28 uint8" in out and "0: 2, 1: 3" in out
    source = folder.load(tmp_path / "png", folder.Options(), channels=1)
    assert len(source.items) == 10 and {it.split for it in source.items} == {"train", "val", "test"}
    # the pixels survive the round trip: the adapter of the .npz reads the same image
    npz_source = medmnist.load(npz, medmnist.Options(), channels=1)
    png = np.asarray(Image.open(tmp_path / "png" / "val" / "1" / "00001.png"))
    first = next(it for it in npz_source.items if it.path.endswith("val/1"))
    assert np.array_equal(npz_source.read(first, 1)[..., 0], png)


def test_medmnist_check_refuses_another_npz(tmp_path: Path):
    npz = tmp_path / "other.npz"
    np.savez(npz, x=np.zeros(3))
    with pytest.raises(SystemExit, match="no train_images"):
        _script("medmnist_check").main([str(npz)])


def test_chestxray14_patient_subset(tmp_path: Path):
    with open(tmp_path / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Patient ID"])
        for i in range(12):
            name = f"{i // 3:08d}_{i % 3:03d}.png"
            _png(tmp_path / "images" / name)
            w.writerow([name, "Effusion|Mass" if i % 2 else "No Finding", i // 3])
    assert _script("chestxray14").main([str(tmp_path), "--patients", "2", "--out", "sub.csv"]) == 0
    with open(tmp_path / "sub.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    patients = {r["Patient ID"] for r in rows}
    assert len(patients) == 2 and len(rows) == 6  # whole patients, 3 images each
    source = table.load(tmp_path, table.Options(file="sub.csv", image_column="Image Index",
                                                label_column="Finding Labels", label_separator="|",
                                                negative_label="No Finding", group_column="Patient ID"),
                        channels=1)
    assert source.task == "multilabel" and source.classes == ["Effusion", "Mass"] and not source.bad


def test_isic_2019_one_hot(tmp_path: Path):
    images = tmp_path / "ISIC_2019_Training_Input"
    rows = [("ISIC_0000000", "MEL"), ("ISIC_0000001", "NV"), ("ISIC_0000002", "NV"),
            ("ISIC_0000003", None), ("ISIC_0000004", "BCC")]
    cols = ["MEL", "NV", "BCC", "UNK"]
    with open(tmp_path / "gt.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *cols])
        for name, label in rows:
            if name != "ISIC_0000004":  # listed but missing: left out
                _png(images / f"{name}.jpg")
            w.writerow([name, *("1.0" if c == label else "0.0" for c in cols)])
    out = tmp_path / "isic" / "labels.csv"
    assert _script("isic").main([str(tmp_path / "gt.csv"), "--images", str(images), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["label"] for r in written] == ["MEL", "NV", "NV"]  # no-label and missing rows left out
    assert "UNK" not in written[0]  # a column with no positive row is dropped
    single = table.load(out.parent, table.Options(file="labels.csv", label_column="label"), channels=3)
    assert single.classes == ["MEL", "NV"] and not single.bad
    onehot = table.load(out.parent, table.Options(file="labels.csv", label_columns=["MEL", "NV", "BCC"]),
                        channels=3)
    assert [it.target for it in onehot.items] == [(1, 0, 0), (0, 1, 0), (0, 1, 0)]


def test_isic_2020_benign_malignant(tmp_path: Path):
    with open(tmp_path / "gt2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "patient_id", "lesion_id", "diagnosis", "benign_malignant", "target"])
        for i, bm in enumerate(["benign", "malignant", "benign"]):
            _png(tmp_path / "train" / f"ISIC_{i}.jpg")
            w.writerow([f"ISIC_{i}", f"IP_{i % 2}", "", "unknown", bm, int(bm == "malignant")])
    out = tmp_path / "labels.csv"
    assert _script("isic").main([str(tmp_path / "gt2020.csv"), "--images", str(tmp_path / "train"),
                                 "--out", str(out)]) == 0
    source = table.load(tmp_path, table.Options(file="labels.csv", group_column="group"), channels=3)
    assert source.task == "binary" and [it.group for it in source.items] == ["IP_0", "IP_1", "IP_0"]


def test_lfw_min_images_and_links(tmp_path: Path):
    src = tmp_path / "lfw"
    for person, n in (("A_B", 3), ("C_D", 2), ("E_F", 1)):
        for i in range(n):
            _png(src / person / f"{person}_{i:04d}.jpg", value=10 * i)
    (src / "A_B" / "notes.txt").write_text("x")
    assert _script("lfw").main([str(src), str(tmp_path / "out"), "--min-images", "2", "--link"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["A_B", "C_D"]
    assert len(list((tmp_path / "out" / "A_B").iterdir())) == 3
    assert (tmp_path / "out" / "A_B" / "A_B_0000.jpg").is_symlink()
    with pytest.raises(SystemExit, match="lower --min-images"):
        _script("lfw").main([str(src), str(tmp_path / "out2"), "--min-images", "3"])


def test_check_folder_lists_problems_and_splits(tmp_path: Path, capsys):
    root = tmp_path / "mine"
    for c in ("ants", "bees"):
        for i in range(10):
            _png(root / c / f"{i}.png", value=20 * i)
    (root / "ants" / "readme.txt").write_text("not an image")
    corrupt = root / "bees" / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code = _script("check_folder").main([str(root), "--split-to", str(tmp_path / "split"),
                                         "--val", "0.2", "--test", "0.2"])
    out = capsys.readouterr().out
    assert code == 1  # an unreadable image was found
    assert str(root / "ants" / "readme.txt") in out and str(corrupt) in out
    assert "ants: 10 images" in out and "bees: 10 images (1 unreadable)" in out
    split = folder.load(tmp_path / "split", folder.Options(), channels=3)
    counts = {s: sum(it.split == s for it in split.items) for s in ("train", "val", "test")}
    assert counts == {"train": 12, "val": 4, "test": 4}
    assert not any(Path(it.path).name == "broken.jpg" for it in split.items)


def test_check_folder_clean_ready_split(tmp_path: Path, capsys):
    for s in ("train", "val"):
        for c in ("x", "y"):
            _png(tmp_path / s / c / "1.png")
    assert _script("check_folder").main([str(tmp_path)]) == 0
    assert "train/x: 1 images" in capsys.readouterr().out
