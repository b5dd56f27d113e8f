"""effft predict through the DataLoader: loader workers change nothing in the CSV, rows are
written as batches finish, a killed predict leaves no CSV at --out and a partial file of whole
rows, and a device that is not there is a clean error."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import effft
from effft.cli import run as cli
from effft.infer import predict as predict_module
from effft.infer.explain import explain_paths
from effft.infer.loaded_run import load_run
from effft.infer.predict import predict, predict_paths
from effft.paths import growing_file, partial_path

from test_predict import make_ckpt, read_csv, reference_probs, write_images  # tests/infer is on the path

pytestmark = pytest.mark.usefixtures("one_thread")


def folder_with_a_broken_file(tmp_path: Path, n: int = 5) -> tuple[list[Path], Path]:
    good = write_images(tmp_path / "imgs", n)
    broken = tmp_path / "imgs" / "img2b.jpg"  # sorted between img2 and img3: in the middle of a batch
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return good, broken


def test_workers_give_the_csv_of_reading_in_one_process(tmp_path: Path) -> None:
    classes = ["cat", "dog", "eel", "fox"]
    model = make_ckpt(tmp_path / "run.ckpt", classes=classes, task="multiclass")
    good, broken = folder_with_a_broken_file(tmp_path)
    texts = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.csv"
        assert cli(["-q", "predict", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(out),
                    "--batch-size", "2", "--workers", str(workers), "--device", "cpu"]) == 0
        texts[workers] = out.read_text()
    assert texts[0] == texts[2]
    rows = read_csv(tmp_path / "w2.csv")
    assert [r["path"] for r in rows] == sorted(str(p) for p in [*good, broken])  # every file, in order
    bad = next(r for r in rows if r["path"] == str(broken))
    assert bad["error"] and bad["label_1"] == "" and bad["prob_1"] == ""
    ref = reference_probs(model, good, task="multiclass")
    by_path = {r["path"]: r for r in rows}
    for path, probs in zip(good, ref):
        top = probs.topk(1)
        assert by_path[str(path)]["label_1"] == classes[int(top.indices)]
        assert float(by_path[str(path)]["prob_1"]) == pytest.approx(float(top.values), abs=1e-5)


def test_loader_batches_give_the_model_s_probabilities(tmp_path: Path) -> None:
    model = make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    good, broken = folder_with_a_broken_file(tmp_path)
    files = [*good[:3], broken, *good[3:]]
    preds = predict_paths(load_run(tmp_path / "run.ckpt"), files, batch_size=2, workers=2, progress=False)
    assert preds.paths == files
    assert [e is not None for e in preds.errors] == [False, False, False, True, False, False]
    assert torch.isnan(preds.probs[3]).all()
    keep = [0, 1, 2, 4, 5]
    ref = reference_probs(model, good, task="multiclass")
    assert ref.max() > 0.5  # confident, unequal probabilities: the comparison means something
    torch.testing.assert_close(preds.probs[keep], ref, atol=1e-5, rtol=0)


def test_rows_are_written_as_each_batch_is_predicted(tmp_path: Path, monkeypatch) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    paths = write_images(tmp_path / "imgs", 5)
    out = tmp_path / "p.csv"
    seen = []  # the partial file's lines when each batch reaches the model
    model_batch = predict_module.predict_batch

    def watched(run, batch, **kw):
        seen.append((out.exists(), len(partial_path(out).read_text().splitlines())))
        return model_batch(run, batch, **kw)

    monkeypatch.setattr(predict_module, "predict_batch", watched)
    predict(tmp_path / "run.ckpt", paths, out=out, batch_size=2, workers=0, progress=False)
    # the header, then two rows per batch finished; --out appears only at the end
    assert seen == [(False, 1), (False, 3), (False, 5)]
    assert len(read_csv(out)) == 5 and not partial_path(out).exists()


def test_ctrl_c_leaves_the_rows_done_and_says_where(tmp_path: Path, monkeypatch, capsys) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    write_images(tmp_path / "imgs", 5)
    out = tmp_path / "p.csv"
    calls = []
    model_batch = predict_module.predict_batch

    def interrupted_at_the_second_batch(run, batch, **kw):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return model_batch(run, batch, **kw)

    monkeypatch.setattr(predict_module, "predict_batch", interrupted_at_the_second_batch)
    code = cli(["predict", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(out), "--batch-size", "2",
                "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 130 and f"{out} was not written" in err and "first 2 of 5 files" in err
    assert str(partial_path(out)) in err
    assert "Traceback" not in err and not out.exists()
    rows = read_csv(partial_path(out))
    assert [Path(r["path"]).name for r in rows] == ["img0.png", "img1.png"] and all(r["label_1"] for r in rows)


def test_growing_file_is_renamed_when_whole_and_left_partial_otherwise(tmp_path: Path) -> None:
    out = tmp_path / "rows.csv"
    out.write_text("an earlier result\n")
    with pytest.raises(RuntimeError):
        with growing_file(out) as append:
            append("a,b\r\n")
            append("1,2\r\n")
            assert partial_path(out).read_bytes() == b"a,b\r\n1,2\r\n"  # each piece is there at once
            raise RuntimeError("stopped")
    assert out.read_text() == "an earlier result\n"  # untouched
    assert partial_path(out).read_bytes() == b"a,b\r\n1,2\r\n"
    with growing_file(out) as append:  # a new attempt starts the partial file again
        append("a,b\r\n")
    assert out.read_bytes() == b"a,b\r\n" and not partial_path(out).exists()


def test_a_killed_predict_leaves_no_csv_and_whole_rows_in_the_partial_file(tmp_path: Path) -> None:
    # slow enough to be caught: 300 files, two per batch, the model at 160 px
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass", image_size=160)
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    out = tmp_path / "p.csv"
    partial = partial_path(out)
    env = {**os.environ, "PYTHONPATH": str(Path(effft.__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "effft.cli", "-q", "predict", str(tmp_path / "run.ckpt"),
                             str(folder), "--out", str(out), "--batch-size", "2", "--workers", "1", "--device", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and partial.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"predict ended before it could be killed: {proc.stderr.read().decode()}"
        os.killpg(proc.pid, signal.SIGKILL)  # predict and its loader worker, at once
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    assert not out.exists()
    text = partial.read_bytes().decode()
    assert text.endswith("\r\n")  # no row cut short
    rows = list(csv.reader(text.splitlines()))
    header, rows = rows[0], rows[1:]
    assert header[:3] == ["path", "label_1", "prob_1"] and header[-1] == "error"
    assert 3 <= len(rows) < 300 and len(rows) % 2 == 0  # whole batches of two
    assert [r[0] for r in rows] == [str(folder / f"{i:03d}.png") for i in range(len(rows))]
    for row in rows:
        assert len(row) == len(header) and row[1] in ("a", "b", "c") and 0 < float(row[2]) <= 1 and row[-1] == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_gpu_that_is_not_there_is_a_clean_error(tmp_path: Path, capsys) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    write_images(tmp_path / "imgs", 1)
    args = ["predict", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(tmp_path / "p.csv")]
    for extra, named in ((["--device", "cuda"], "--device cuda"), (["--device", "cuda:1"], "--device cuda:1"),
                         (["--precision", "bf16"], "--precision bf16")):
        assert cli([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err and ("--device cpu" in err or "fp32" in err)
    assert not (tmp_path / "p.csv").exists() and not partial_path(tmp_path / "p.csv").exists()
    explained = tmp_path / "explained"
    assert cli(["explain", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(explained),
                "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err and "Traceback" not in err and not explained.exists()
    with pytest.raises(SystemExit) as exit_:  # not a device name at all: argparse's error
        cli([*args, "--device", "gpu"])
    assert exit_.value.code == 2 and "choose auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_explain_reads_through_the_loader_workers(tmp_path: Path) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    good, broken = folder_with_a_broken_file(tmp_path, n=4)
    files = sorted([*good, broken])
    run = load_run(tmp_path / "run.ckpt")
    one, bad_one = explain_paths(run, files, batch_size=2, workers=0, progress=False)
    two, bad_two = explain_paths(run, files, batch_size=2, workers=2, progress=False)
    assert bad_one == bad_two and [p for p, _ in bad_two] == [broken]
    assert [e.path for e in two] == good and [e.class_index for e in two] == [e.class_index for e in one]
    for a, b in zip(one, two):
        np.testing.assert_allclose(a.cam, b.cam, atol=1e-6)


@pytest.mark.slow  # torch.compile's first call: about a minute of compiling on a 2-core CPU
def test_compile_gives_the_eager_csv_for_a_last_batch_and_a_batch_with_a_broken_file(tmp_path: Path, capsys) -> None:
    classes = ["cat", "dog", "eel"]
    make_ckpt(tmp_path / "run.ckpt", classes=classes, task="multiclass")
    folder_with_a_broken_file(tmp_path, n=6)  # 7 files in batches of 4: 3 readable, then 3 and a short one
    rows = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / f"p{len(flags)}.csv"
        assert cli(["predict", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(out),
                    "--batch-size", "4", "--workers", "0", "--device", "cpu", *flags]) == 0
        rows[len(flags)] = read_csv(out)
    err = capsys.readouterr()
    assert "compiled the model for batches of 4" in err.out + err.err and "CUDA_HOME" not in err.out + err.err
    assert [r["path"] for r in rows[0]] == [r["path"] for r in rows[1]]
    for eager, compiled in zip(rows[0], rows[1]):
        assert eager["error"] == compiled["error"] and eager["label_1"] == compiled["label_1"]
        for k in (1, 2, 3):
            if eager[f"prob_{k}"]:
                assert float(compiled[f"prob_{k}"]) == pytest.approx(float(eager[f"prob_{k}"]), abs=1e-4)


def test_compile_is_refused_for_onnx_runtime(tmp_path: Path, capsys) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b"], task="binary")
    write_images(tmp_path / "imgs", 2)
    out = tmp_path / "p.csv"
    assert cli(["predict", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(out),
                "--engine", "onnxruntime", "--compile"]) == 1
    err = capsys.readouterr().err
    assert "--compile is for --engine torch" in err and "Traceback" not in err and not out.exists()


def test_a_compiler_that_fails_is_one_message_before_any_file_is_read(tmp_path: Path, monkeypatch, capsys) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    write_images(tmp_path / "imgs", 2)

    def no_compiler(model, **kwargs):
        def call(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(a long explanation)")
        return call

    monkeypatch.setattr(torch, "compile", no_compiler)
    out = tmp_path / "p.csv"
    assert cli(["predict", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(out), "--compile",
                "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "--compile: torch.compile failed (InvalidCxxCompiler: No working C++ compiler found)" in err
    assert "Traceback" not in err and not out.exists() and not partial_path(out).exists()


def test_explain_on_the_device_asked_for_writes_the_overlays(tmp_path: Path) -> None:
    make_ckpt(tmp_path / "run.ckpt", classes=["a", "b", "c"], task="multiclass")
    good = write_images(tmp_path / "imgs", 3)
    out = tmp_path / "explained"
    assert cli(["-q", "explain", str(tmp_path / "run.ckpt"), str(tmp_path / "imgs"), "--out", str(out),
                "--device", "cpu", "--workers", "0"]) == 0
    rows = read_csv(out / "explain.csv")
    assert sorted(r["path"] for r in rows) == sorted(map(str, good))
    assert all((out / r["overlay"]).is_file() for r in rows)
