"""The folder, csv and medmnist adapters on generated files and on ../shared/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from effft.data import sources
from effft.data.sources import folder, medmnist, table
from effft.errors import EffftError


def write_image(path: Path, *, size=(40, 32), mode="RGB", seed=0, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, format=fmt)
    return path


# ---------------------------------------------------------------- folder


def test_folder_photos_of_unsupported_formats_and_broken_links_are_reported_by_path(tmp_path):
    from effft.data.scan import scan

    write_image(tmp_path / "dog" / "a.png")
    write_image(tmp_path / "cat" / "b.png")
    (tmp_path / "cat" / "photo.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (tmp_path / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image, not a photo")
    src = folder.load(tmp_path, folder.Options(), channels=3)
    assert sorted(Path(it.path).name for it in src.items) == ["a.png", "b.png", "gone.png", "photo.HEIC"]
    bad = {Path(b.path).name: b.reason for b in scan([it.path for it in src.items], decode=True)}
    assert set(bad) == {"gone.png", "photo.HEIC"}


def test_folder_classes_nested_mixed_suffixes(tmp_path):
    write_image(tmp_path / "dog" / "a.JPG", fmt="JPEG")
    write_image(tmp_path / "dog" / "sub" / "deeper" / "b.png")
    write_image(tmp_path / "cat" / "c.jpeg", fmt="JPEG", mode="L")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0\0")
    src = folder.load(tmp_path, folder.Options(), channels=3)
    assert src.classes == ["cat", "dog"]  # sorted
    assert src.task == "binary"
    by_name = {Path(it.path).name: it for it in src.items}
    assert set(by_name) == {"a.JPG", "b.png", "c.jpeg"}
    assert by_name["c.jpeg"].target == 0 and by_name["b.png"].target == 1
    assert all(it.split is None for it in src.items)
    img = src.read(by_name["c.jpeg"], 3)
    assert img.shape == (32, 40, 3) and img.dtype == np.uint8
    assert src.read(by_name["a.JPG"], 1).shape == (32, 40, 1)


def test_folder_three_classes_is_multiclass(tmp_path):
    for c in ("b", "a", "c"):
        write_image(tmp_path / c / "1.png")
    src = folder.load(tmp_path, folder.Options(), channels=3)
    assert src.classes == ["a", "b", "c"] and src.task == "multiclass"


def test_folder_ready_split(tmp_path):
    for split in ("train", "val", "test"):
        for c in ("no", "yes"):
            write_image(tmp_path / split / c / f"{split}_{c}.png")
    src = folder.load(tmp_path, folder.Options(), channels=3)
    assert src.classes == ["no", "yes"]
    assert sorted((Path(it.path).name, it.split) for it in src.items) == sorted(
        (f"{s}_{c}.png", s) for s in ("train", "val", "test") for c in ("no", "yes"))
    # the same folders read as classes when ready_split is off
    src = folder.load(tmp_path, folder.Options(ready_split=False), channels=3)
    assert src.classes == ["test", "train", "val"] and all(it.split is None for it in src.items)


def test_folder_ready_split_class_missing_in_val_warns(tmp_path, caplog):
    write_image(tmp_path / "train" / "a" / "1.png")
    write_image(tmp_path / "train" / "b" / "1.png")
    write_image(tmp_path / "val" / "a" / "1.png")
    (tmp_path / "val" / "b").mkdir()
    src = folder.load(tmp_path, folder.Options(), channels=3)
    assert len(src.items) == 3
    assert "val" in caplog.text and "no images" in caplog.text


def test_folder_empty_class_is_an_error_naming_it(tmp_path):
    write_image(tmp_path / "cat" / "1.png")
    write_image(tmp_path / "dog" / "1.png")
    (tmp_path / "bird").mkdir()
    (tmp_path / "bird" / "readme.txt").write_text("x")
    with pytest.raises(EffftError, match=r"class folder .*bird has no images \(it holds 1 file"):
        folder.load(tmp_path, folder.Options(), channels=3)


def test_folder_one_class_is_an_error(tmp_path):
    write_image(tmp_path / "only" / "1.png")
    with pytest.raises(EffftError, match="one class folder \\(only\\).*at least two"):
        folder.load(tmp_path, folder.Options(), channels=3)


def test_folder_missing_or_flat_root(tmp_path):
    with pytest.raises(EffftError, match="does not exist"):
        folder.load(tmp_path / "nope", folder.Options(), channels=3)
    write_image(tmp_path / "flat.png")
    with pytest.raises(EffftError, match="no class folders"):
        folder.load(tmp_path, folder.Options(), channels=3)


def test_folder_on_brain_mri(shared_data):
    root = shared_data / "brain_mri"
    src = folder.load(root, folder.Options(), channels=3)
    assert src.classes == ["no", "yes"]
    n_yes = sum(it.target == 1 for it in src.items)
    n_no = sum(it.target == 0 for it in src.items)
    # every file is an image with one of .jpg/.JPG/.jpeg/.png: all of them are found
    on_disk = [len([f for f in (root / c).iterdir() if f.is_file()]) for c in ("yes", "no")]
    assert (n_yes, n_no) == tuple(on_disk) and n_no == 98 and n_yes >= 155
    suffixes = {Path(it.path).suffix for it in src.items}
    assert {".jpg", ".JPG", ".jpeg", ".png"} <= suffixes
    img = src.read(src.items[0], 1)
    assert img.ndim == 3 and img.shape[2] == 1


# ---------------------------------------------------------------- csv


def _csv_data(tmp_path: Path, rows: list[str], header: str, name="labels.csv") -> Path:
    for i in range(6):
        write_image(tmp_path / "img" / f"{i}.png", seed=i)
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_single_label_with_groups_and_split(tmp_path):
    path = _csv_data(tmp_path, header="image,label,patient,split", rows=[
        "img/0.png,cat,p1,train", "img/1.png,dog,p1,train", "img/2.png,bird,p2,val",
        f"{tmp_path}/img/3.png,dog,p3,test"])  # an absolute path
    src = table.load(path, table.Options(group_column="patient", split_column="split"),
                     channels=3)
    assert src.classes == ["bird", "cat", "dog"] and src.task == "multiclass"
    assert [(Path(it.path).name, it.target, it.group, it.split) for it in src.items] == [
        ("0.png", 1, "p1", "train"), ("1.png", 2, "p1", "train"), ("2.png", 0, "p2", "val"),
        ("3.png", 2, "p3", "test")]
    assert src.read(src.items[0], 3).shape == (32, 40, 3)


def test_csv_tsv_in_a_folder_numeric_labels_sorted_as_numbers(tmp_path):
    path = _csv_data(tmp_path, header="path\ty", name="t.tsv",
                     rows=[f"img/{i}.png\t{v}" for i, v in enumerate([2, 10, 2, 1])])
    src = table.load(tmp_path, table.Options(file="t.tsv", image_column="path",
                                             label_column="y"), channels=3)
    assert src.classes == ["1", "2", "10"]
    assert [it.target for it in src.items] == [1, 2, 1, 0]


def test_csv_sniffs_semicolons(tmp_path):
    path = _csv_data(tmp_path, header="image;label", rows=["img/0.png;a", "img/1.png;b"])
    src = table.load(path, table.Options(), channels=3)
    assert src.classes == ["a", "b"] and src.task == "binary"


def test_csv_multilabel_columns(tmp_path):
    path = _csv_data(tmp_path, header="image,Effusion,Mass,Nodule", rows=[
        "img/0.png,1,0,1", "img/1.png,0,0,0", "img/2.png,0,1.0,0"])
    src = table.load(path, table.Options(label_columns=["Effusion", "Mass", "Nodule"]),
                     channels=3)
    assert src.task == "multilabel" and src.classes == ["Effusion", "Mass", "Nodule"]
    assert [it.target for it in src.items] == [(1, 0, 1), (0, 0, 0), (0, 1, 0)]


def test_csv_multilabel_separator_and_negative_label(tmp_path):
    path = _csv_data(tmp_path, header="image,findings", rows=[
        "img/0.png,Effusion|Mass", "img/1.png,No Finding", "img/2.png,Mass", "img/3.png,"])
    src = table.load(path, table.Options(label_column="findings", label_separator="|",
                                         negative_label="No Finding"), channels=3)
    assert src.classes == ["Effusion", "Mass"] and src.task == "multilabel"
    assert [it.target for it in src.items] == [(1, 1), (0, 0), (0, 1), (0, 0)]


def test_csv_missing_file_reported_with_line(tmp_path):
    path = _csv_data(tmp_path, header="image,label", rows=[
        "img/0.png,a", "img/gone.png,b", "img/1.png,b"])
    src = table.load(path, table.Options(), channels=3)
    assert len(src.items) == 2
    assert len(src.bad) == 1
    assert src.bad[0].path.endswith("gone.png")
    assert "line 3" in src.bad[0].reason and "not found" in src.bad[0].reason


def test_csv_image_listed_twice_is_an_error_naming_both_lines(tmp_path):
    # the same file by two spellings: it could otherwise be in train and in test at once
    path = _csv_data(tmp_path, header="image,label", rows=[
        "img/0.png,a", "img/1.png,b", f"{tmp_path}/img/0.png,a", "img/2.png,b"])
    with pytest.raises(EffftError, match=r"lines 2 and 4 both list .*0\.png: list each image once"):
        table.load(path, table.Options(), channels=3)


def test_csv_unknown_label_names_row_and_value(tmp_path):
    path = _csv_data(tmp_path, header="image,label", rows=[
        "img/0.png,cat", "img/1.png,dgo", "img/2.png,dog"])
    with pytest.raises(EffftError, match=r"line 3: label 'dgo' is not one of .*did you mean 'dog'"):
        table.load(path, table.Options(classes=["cat", "dog"]), channels=3)


def test_csv_bad_column_and_flag_errors(tmp_path):
    path = _csv_data(tmp_path, header="img,label", rows=["img/0.png,a", "img/1.png,b"])
    with pytest.raises(EffftError, match=r"no column 'image'.*did you mean 'img'"):
        table.load(path, table.Options(), channels=3)
    path = _csv_data(tmp_path, header="image,A,B", rows=["img/0.png,1,-1"])
    with pytest.raises(EffftError, match=r"line 2, column 'B': '-1' is not 0 or 1"):
        table.load(path, table.Options(label_columns=["A", "B"]), channels=3)


def test_csv_options_validation():
    with pytest.raises(ValueError, match="not both"):
        table.Options(label_columns=["a", "b"], label_column="x")
    with pytest.raises(ValueError, match="only applies with label_separator"):
        table.Options(negative_label="No Finding")
    with pytest.raises(ValueError, match="extra"):
        table.Options(labelcolumn="x")


# ---------------------------------------------------------------- medmnist


def _npz(path: Path, *, rgb=False, labels_width=1, n=(6, 3, 3), classes=3, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, 28, 28, 3) if rgb else (k, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if labels_width == 1:
            lab = (np.arange(k) % classes)[:, None]
        else:
            lab = rng.integers(0, 2, (k, labels_width))
        arrays[f"{split}_labels"] = lab.astype(np.uint8)
    np.savez(path, **arrays)
    return arrays


def test_medmnist_grey(tmp_path):
    arrays = _npz(tmp_path / "x.npz")
    src = medmnist.load(tmp_path / "x.npz", medmnist.Options(), channels=1)
    assert src.classes == ["0", "1", "2"] and src.task == "multiclass"
    assert [it.split for it in src.items] == ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    it = src.items[7]
    assert it.path == f"{tmp_path / 'x.npz'}::val/1" and it.target == 1
    np.testing.assert_array_equal(src.read(it, 1)[:, :, 0], arrays["val_images"][1])
    rgb = src.read(it, 3)
    assert rgb.shape == (28, 28, 3) and (rgb == arrays["val_images"][1][:, :, None]).all()


def test_medmnist_rgb_to_grey_matches_pillow(tmp_path):
    arrays = _npz(tmp_path / "x.npz", rgb=True, classes=2)
    src = medmnist.load(tmp_path, medmnist.Options(file="x.npz", classes=["no", "yes"]),
                        channels=3)
    assert src.classes == ["no", "yes"] and src.task == "binary"
    np.testing.assert_array_equal(src.read(src.items[0], 3), arrays["train_images"][0])
    grey = src.read(src.items[0], 1)[:, :, 0].astype(int)
    reference = np.asarray(Image.fromarray(arrays["train_images"][0]).convert("L")).astype(int)
    assert np.abs(grey - reference).max() <= 1


def test_medmnist_multilabel(tmp_path):
    arrays = _npz(tmp_path / "chest.npz", labels_width=14)
    src = medmnist.load(tmp_path, medmnist.Options(), channels=1)  # the one .npz in the folder
    assert src.task == "multilabel" and len(src.classes) == 14
    assert src.items[0].target == tuple(int(v) for v in arrays["train_labels"][0])
    with pytest.raises(EffftError, match="names 2 classes but .* 14 label columns"):
        medmnist.load(tmp_path / "chest.npz", medmnist.Options(classes=["a", "b"]), channels=1)


def test_medmnist_bad_files(tmp_path):
    with pytest.raises(EffftError, match="does not exist"):
        medmnist.load(tmp_path / "nope.npz", medmnist.Options(), channels=1)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(EffftError, match="no train_images"):
        medmnist.load(tmp_path / "other.npz", medmnist.Options(), channels=1)


def test_medmnist_pickles_without_arrays(tmp_path):
    import pickle

    _npz(tmp_path / "x.npz")
    src = medmnist.load(tmp_path / "x.npz", medmnist.Options(), channels=1)
    src.read(src.items[0], 1)
    copy = pickle.loads(pickle.dumps(src))
    assert copy._arrays == {}
    np.testing.assert_array_equal(copy.read(src.items[0], 1), src.read(src.items[0], 1))


def test_medmnist_breastmnist(shared_data):
    path = shared_data / "breastmnist.npz"
    src = medmnist.load(path, medmnist.Options(classes=["malignant", "normal+benign"]),
                        channels=1)
    splits = [it.split for it in src.items]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (546, 78, 156)
    assert src.task == "binary"
    with np.load(path) as z:
        expected = z["test_images"][5]
        label = int(z["test_labels"][5, 0])
    item = [it for it in src.items if it.path.endswith("::test/5")][0]
    assert item.target == label
    np.testing.assert_array_equal(src.read(item, 1)[:, :, 0], expected)


# ---------------------------------------------------------------- registry


def test_adapters_registry_imports_lazily():
    assert set(sources.ADAPTERS) == {"folder", "csv", "medmnist", "dicom", "face"}
    assert sources.adapter("csv") is table
    for name in sources.ADAPTERS:
        module = sources.adapter(name)
        assert hasattr(module, "Options") and callable(module.load)
    with pytest.raises(EffftError, match="unknown data adapter 'xls'"):
        sources.adapter("xls")
