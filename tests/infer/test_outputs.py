"""Where predict, explain and export write: never over what they read, never into a run's own
files, and on a full disk nothing half-written (no partial file, no temporary left)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from effft.cli import run as cli
from test_predict import make_ckpt, write_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory as `effft fit` leaves it (the files that matter here)."""
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    make_ckpt(run / "checkpoints" / "best.ckpt", classes=["a", "b", "c"], task="multiclass", image_size=32)
    (run / "recipe.yaml").write_text("name: r\n")
    (run / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"], "task": "multiclass"}))
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["checkpoints/best.ckpt", "checkpoints/other.csv", "recipe.yaml", "logs/p.csv"])
def test_predict_refuses_an_out_inside_the_runs_own_files(run_dir: Path, tmp_path: Path, where: str, capsys) -> None:
    images = write_images(tmp_path / "imgs", 2)
    before = snapshot(run_dir)
    out = run_dir / where
    assert cli(["predict", str(run_dir), str(images[0]), "--out", str(out)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    said = "is an input file" if where == "checkpoints/best.ckpt" else f"is part of the run directory {run_dir}"
    assert f"--out {out} {said}" in err and "Traceback" not in err
    assert snapshot(run_dir) == before


def test_predict_refuses_an_out_that_is_an_input_image_or_the_checkpoint(run_dir: Path, tmp_path: Path, capsys) -> None:
    images = write_images(tmp_path / "imgs", 2)
    before = snapshot(tmp_path / "imgs")
    for out in (images[1], tmp_path / "imgs" / "." / images[0].name):  # a file found in a folder given; spelt otherwise
        assert cli(["predict", str(run_dir), str(tmp_path / "imgs"), "--out", str(out)]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"--out {out} is an input file" in err and "Traceback" not in err
    loose = tmp_path / "loose.ckpt"
    make_ckpt(loose, classes=["a", "b"], task="binary", image_size=32)
    assert cli(["predict", str(loose), str(images[0]), "--out", str(loose)]) == 1
    assert f"--out {loose} is an input file" in " ".join(capsys.readouterr().err.split())
    assert snapshot(tmp_path / "imgs") == before
    # a CSV beside the run's files, or in the image folder, is fine
    assert cli(["-q", "predict", str(run_dir), str(tmp_path / "imgs"), "--out", str(run_dir / "preds.csv")]) == 0
    assert cli(["-q", "predict", str(run_dir), str(tmp_path / "imgs"), "--out", str(tmp_path / "imgs" / "p.csv")]) == 0


def test_explain_refuses_the_run_directory_and_an_input_folder(run_dir: Path, tmp_path: Path, capsys) -> None:
    write_images(tmp_path / "imgs", 1)
    before = snapshot(tmp_path)
    for out, said in [(run_dir, "is a run directory"), (run_dir / "report", "is part of the run directory"),
                      (tmp_path / "imgs", "is the input folder"), (tmp_path / "imgs" / "maps", "is the input folder")]:
        assert cli(["explain", str(run_dir), str(tmp_path / "imgs"), "--out", str(out)]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"--out {out} {said}" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_export_refuses_the_checkpoint_and_the_runs_files(run_dir: Path, tmp_path: Path, capsys) -> None:
    before = snapshot(run_dir)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    for out in (ckpt, run_dir / "checkpoints" / "model.pt", run_dir / "metrics.json"):
        assert cli(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"--out {out}" in err and "Traceback" not in err
    assert snapshot(run_dir) == before
    # a checkpoint of the run given: written to the run's export/ folder, not into checkpoints/
    assert cli(["export", str(ckpt), "--format", "torchscript"]) == 0
    assert (run_dir / "export" / "best.pt").is_file() and (run_dir / "export" / "best.preprocessing.json").is_file()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_on_a_full_disk_names_the_file_and_leaves_nothing(run_dir: Path, tmp_path: Path, fmt: str,
                                                                  monkeypatch, capsys) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")

    def full(self, data):  # the disk fills while the export is written
        with open(self, "wb") as f:
            f.write(bytes(data)[:100])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "exports" / f"model.{fmt}"
    assert cli(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot write {out}: No space left on device (the disk is full)" in err
    assert ".tmp" not in err and "Traceback" not in err
    assert list((tmp_path / "exports").iterdir()) == []  # no partial file, no temporary, no JSON


def test_nothing_is_written_over_the_data_the_run_was_trained_on(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    images = write_images(data / "a", 2)
    (data / "labels.csv").write_text("path,label\na/img0.png,a\n")
    for adapter in ("csv", "folder"):
        ckpt = tmp_path / f"{adapter}.ckpt"
        make_ckpt(ckpt, classes=["a", "b"], task="binary", image_size=32, data={"adapter": adapter, "root": str(data)})
        before = snapshot(data)
        assert cli(["predict", str(ckpt), str(images[0]), "--out", str(data / "labels.csv")]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"--out {data / 'labels.csv'} is inside the data the run was trained on ({data}" in err
        assert snapshot(data) == before
    # the folder adapter reads every image under its root: no overlays there
    assert cli(["explain", str(tmp_path / "folder.ckpt"), str(images[0]), "--out", str(data / "maps")]) == 1
    assert "inside the data the run was trained on" in capsys.readouterr().err
    assert not (data / "maps").exists()
