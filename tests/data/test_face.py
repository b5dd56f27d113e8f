"""The `face` adapter: detection on real faces, crops, images without a face, real identities."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from skimage.feature import Cascade

from effft.data.sources import face
from effft.data.sources.face import Box, FaceDetector
from effft.errors import EffftError


def _iou(a: Box, b: Box) -> float:
    top, left = max(a.top, b.top), max(a.left, b.left)
    bottom = min(a.top + a.height, b.top + b.height)
    right = min(a.left + a.width, b.left + b.width)
    inter = max(0, bottom - top) * max(0, right - left)
    return inter / (a.height * a.width + b.height * b.width - inter)


@pytest.fixture(scope="module")
def astronaut_face() -> Box:
    """The reference: scikit-image's cascade on the full-resolution astronaut, largest face."""
    cascade = Cascade(data.lbp_frontal_face_cascade_filename())
    found = cascade.detect_multi_scale(img=data.astronaut(), scale_factor=1.2, step_ratio=1,
                                       min_size=(60, 60), max_size=(200, 200))
    best = max(found, key=lambda d: d["width"])
    return Box(top=best["r"], left=best["c"], height=best["height"], width=best["width"])


def _people(root: Path) -> Path:
    """Two people: the astronaut twice (once shifted on a wider canvas), and faceless images."""
    rng = np.random.default_rng(0)
    (root / "eileen").mkdir(parents=True)
    (root / "nobody").mkdir()
    Image.fromarray(data.astronaut()).save(root / "eileen" / "a.png")
    canvas = np.full((612, 662, 3), 255, np.uint8)
    canvas[100:, 150:] = data.astronaut()
    Image.fromarray(canvas).save(root / "eileen" / "shifted.jpg", quality=92)
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
        root / "nobody" / "noise.png")
    Image.fromarray(np.full((64, 80), 200, np.uint8)).save(root / "nobody" / "blank.png")
    (root / "nobody" / "Thumbs.db").write_bytes(b"\0" * 64)
    return root


def test_detector_finds_the_astronaut(astronaut_face: Box) -> None:
    grey = np.asarray(Image.fromarray(data.astronaut()).convert("L"))
    box = FaceDetector().largest_face(grey)
    assert box is not None
    assert _iou(box, astronaut_face) > 0.5
    assert FaceDetector().largest_face(np.full((96, 96), 128, np.uint8)) is None


def test_adapter_crops_faces_and_lists_images_without_one(tmp_path: Path,
                                                          astronaut_face: Box) -> None:
    root = _people(tmp_path / "people")
    source = face.load(root, face.Options(margin=0.2), channels=3)
    assert source.classes == ["eileen", "nobody"] and source.task == "multiclass"
    assert all(i.group is None for i in source.items)
    assert len(source.items) == 4 and sum(box is not None for box in source.boxes.values()) == 2
    assert sorted(Path(p).name for p in source.no_face) == ["blank.png", "noise.png"]
    assert source.bad == []  # usable: kept uncropped, not unreadable
    assert {Path(b.path).name: b.reason for b in source.no_face_files} == {
        "blank.png": "no face found (kept uncropped, data.face.no_face)",
        "noise.png": "no face found (kept uncropped, data.face.no_face)"}

    items = {Path(i.path).name: i for i in source.items}
    crop = source.read(items["a.png"], 3)
    assert crop.shape[0] < 512 and crop.shape[1] < 512 and crop.shape[2] == 3
    # the crop is the face box widened by 20% on each side: it holds the reference face
    box = source.boxes[items["a.png"].path]
    wide = box.widened(0.2, 512, 512)
    assert crop.shape[:2] == (wide.height, wide.width)
    assert wide.top <= astronaut_face.top and wide.left <= astronaut_face.left
    assert wide.top + wide.height >= astronaut_face.top + astronaut_face.height
    assert wide.left + wide.width >= astronaut_face.left + astronaut_face.width
    np.testing.assert_array_equal(
        crop, data.astronaut()[wide.top:wide.top + wide.height, wide.left:wide.left + wide.width])
    # the same face on a shifted canvas is found where it moved to
    shifted = source.boxes[items["shifted.jpg"].path]
    assert abs(shifted.top - box.top - 100) <= 8 and abs(shifted.left - box.left - 150) <= 8
    # kept uncropped and in grey when asked
    assert source.read(items["noise.png"], 1).shape == (96, 96, 1)


def test_no_face_drop_and_errors(tmp_path: Path) -> None:
    root = _people(tmp_path / "people")
    with pytest.raises(EffftError, match=r"no usable image left for \['nobody'\]"):
        face.load(root, face.Options(no_face="drop"), channels=3)
    Image.fromarray(data.astronaut()).save(root / "nobody" / "face.png")
    source = face.load(root, face.Options(no_face="drop"), channels=3)
    assert sorted(Path(i.path).name for i in source.items) == ["a.png", "face.png",
                                                               "shifted.jpg"]
    assert sorted(Path(p).name for p in source.no_face) == ["blank.png", "noise.png"]
    assert {Path(b.path).name: b.reason for b in source.no_face_files}["noise.png"] == (
        "no face found (left out, data.face.no_face)")
    assert source.bad == []
    (root / "nobody" / "cut.png").write_bytes((root / "eileen" / "a.png").read_bytes()[:3000])
    source = face.load(root, face.Options(), channels=3)
    assert [(Path(b.path).name, "truncated" in b.reason) for b in source.bad] == [
        ("cut.png", True)]
    assert "cut.png" not in {Path(i.path).name for i in source.items}
    (root / "nobody" / "cut.png").unlink()
    plain = face.load(root, face.Options(detect=False), channels=3)
    assert len(plain.items) == 5 and plain.read(plain.items[0], 3).shape == (512, 512, 3)

    (tmp_path / "solo" / "x").mkdir(parents=True)
    with pytest.raises(EffftError, match="one person folder"):
        face.load(tmp_path / "solo", face.Options(), channels=3)
    (tmp_path / "solo" / "y").mkdir()
    with pytest.raises(EffftError, match="holds no images"):
        face.load(tmp_path / "solo", face.Options(), channels=3)
    with pytest.raises(ValueError):
        face.Options(no_face="blur")


def test_widened_box_is_clamped() -> None:
    assert Box(top=5, left=90, height=20, width=20).widened(0.5, 100, 100) == Box(
        top=0, left=80, height=35, width=20)


def _att_subset(shared: Path, dest: Path, per_person: int) -> Path:
    att = shared / "att_faces"
    for person in sorted(p for p in att.iterdir() if p.is_dir()):
        (dest / person.name).mkdir(parents=True)
        for f in sorted(person.glob("*.pgm"))[:per_person]:
            shutil.copy(f, dest / person.name / f.name)
    return dest


def test_att_faces_subset(shared_data: Path, tmp_path: Path,
                          caplog: pytest.LogCaptureFixture) -> None:
    root = _att_subset(shared_data, tmp_path / "att", per_person=2)
    with caplog.at_level(logging.INFO, logger="effft.data.sources.face"):
        source = face.load(root, face.Options(), channels=1)
    assert len(source.classes) == 40 and len(source.items) == 80
    assert f"a face in {sum(box is not None for box in source.boxes.values())} of 80 images" in caplog.text
    # tight 92x112 crops: the border added before detection lets the cascade find nearly all
    assert sum(box is not None for box in source.boxes.values()) + len(source.no_face) == 80
    assert sum(box is not None for box in source.boxes.values()) >= 72, f"faces found in {sum(box is not None for box in source.boxes.values())} of 80"
    widths = [b.width for b in source.boxes.values() if b is not None]
    assert np.median(widths) >= 60  # the face fills these photos: boxes are the face
    for item in source.items[:10]:
        img = source.read(item, 1)
        assert img.ndim == 3 and img.shape[2] == 1 and img.shape[0] <= 112


@pytest.mark.slow
def test_att_faces_all(shared_data: Path) -> None:
    source = face.load(shared_data / "att_faces", face.Options(), channels=1)
    assert len(source.classes) == 40 and len(source.items) == 400
    assert sum(box is not None for box in source.boxes.values()) >= 380, f"faces found in {sum(box is not None for box in source.boxes.values())} of 400"
    assert sum(box is not None for box in source.boxes.values()) + len(source.no_face) == 400


def test_missing_scikit_image_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage.feature", None)
    with pytest.raises(EffftError, match=r"pip install 'effft\[face\]'"):
        FaceDetector()
