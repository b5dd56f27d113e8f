"""A run directory is never mixed, lost or left half-written: two fits of one run, a resume with
a changed recipe, a resume of a finished run, Ctrl-C and SIGTERM, a full disk, a malicious
checkpoint, data that moved. Tiny runs: 16 px images, random initialisation, 2 epochs."""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from effft.cli import run
from effft.errors import EffftError
from effft.runs.layout import locked
from test_fit import COLOURS, ckpt, listing, make_folder, recipe

TINY = dict(data={"image_size": 16, "batch_size": 4})


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def effft(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    # Ctrl-C as an interactive shell delivers it: a process starts with SIGINT ignored when its parent
    # ignores it, and the test process may (Lightning sets SIGINT to ignored when a Trainer it runs
    # meets a KeyboardInterrupt, lightning/pytorch/trainer/call.py); in the whole suite it did, and
    # the Ctrl-C below went unheard
    return subprocess.Popen([sys.executable, "-m", "effft.cli", "-q", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety")


@pytest.fixture(scope="module")
def colours(work) -> Path:
    return make_folder(work / "colours", COLOURS, n=4, size=16)


@pytest.fixture(scope="module")
def finished(work, colours) -> Path:
    """A finished 2-epoch run."""
    assert run(["-q", "fit", str(recipe(work, "done", colours, **TINY))]) == 0
    return work / "runs" / "done"


# ----------------------------------------------------------------------------- one run, one writer


def test_a_run_held_by_another_fit_is_refused_naming_it(work, colours, capsys):
    path = recipe(work, "held", colours, **TINY)
    run_dir = work / "runs" / "held"
    with locked(run_dir):
        for extra in ([], ["--overwrite"]):
            assert run(["-q", "fit", str(path), *extra]) == 1
            err = capsys.readouterr().err
            assert f"the run directory {run_dir} is in use by another effft fit (process {os.getpid()})" in err
            assert "Traceback" not in err
            assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing written beside the lock


def test_a_run_that_fails_before_writing_leaves_no_directory(work, colours, monkeypatch, capsys):
    import effft.runs.fit as fit_module
    from effft.errors import RecipeError

    def refuse(*args, **kwargs):
        raise RecipeError("trainer: refused for the test")

    monkeypatch.setattr(fit_module, "make_trainer", refuse)
    path = recipe(work, "failed", colours, **TINY, output_dir=str(work / "new" / "runs"))
    assert run(["-q", "fit", str(path)]) == 2
    assert "refused for the test" in capsys.readouterr().err
    assert not (work / "new").exists()  # neither the run directory nor the output_dir made for it


def test_sigterm_and_ctrl_c_stop_a_run_with_130_and_143_saying_how_to_resume(work, colours, capsys):
    # far more epochs than the test lets run: both signals land mid-training, however fast the steps
    path = recipe(work, "stopped", colours, data={"image_size": 16, "batch_size": 4},
                  trainer={"max_epochs": 5000, "accelerator": "cpu"})
    run_dir = work / "runs" / "stopped"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = effft("fit", str(path))
    wait_for(last.exists, "last.ckpt", proc)
    # the same run started again meanwhile: refused, naming the directory
    assert run(["-q", "fit", str(path), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"the run directory {run_dir} is in use by another effft fit" in err and "Traceback" not in err
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == (f"stopped by SIGTERM: the run in {run_dir} is unfinished; continue it with: "
                         f"effft fit {path} --resume")
    assert not (run_dir / "metrics.json").exists()
    epochs = ckpt(last)["epoch"]  # whole, and loadable
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]

    proc = effft("fit", str(path), "--resume")
    stamp = last.stat().st_mtime_ns
    wait_for(lambda: last.stat().st_mtime_ns != stamp, "new last.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "stopped by Ctrl-C" in err and f"effft fit {path} --resume" in err
    assert ckpt(last)["epoch"] > epochs
    history = rows(run_dir / "logs" / "csv" / "metrics.csv")  # the epochs of both, in one file
    assert {r["epoch"] for r in history if r.get("val/accuracy")} >= {str(e) for e in range(epochs + 2)}


# ----------------------------------------------------------------------------- resuming


def test_a_resume_refuses_recipe_changes_that_cannot_apply_and_writes_nothing(finished, work, capsys):
    before = listing(finished)
    path = work / "done.yaml"
    for given, keys in [(["--set", "model.arch=efficientnet_b1"], ["model.arch"]),
                        (["--set", "optimizer.lr=0.01", "--set", "data.image_size=24"],
                         ["optimizer.lr", "data.image_size"])]:
        assert run(["-q", "fit", str(path), "--resume", *given]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "cannot change" in err
        for key in keys:
            assert key in err
    assert listing(finished) == before  # recipe.yaml, the checkpoints and metrics.csv as they were
    assert yaml.safe_load((finished / "recipe.yaml").read_text())["model"]["arch"] == "efficientnet_b0"


def test_a_resume_of_a_finished_run_says_so_and_changes_nothing(finished, work, capsys):
    before = listing(finished)
    assert run(["-q", "fit", str(work / "done.yaml"), "--resume"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"the run in {finished} is finished: it has trained 2 epochs" in out
    assert "--resume --set trainer.max_epochs=N (N above 2)" in out and f"effft test {finished}" in out
    assert listing(finished) == before


def test_a_resumed_longer_run_keeps_its_history_and_records_what_changed(finished, work, capsys):
    logged = rows(finished / "logs" / "csv" / "metrics.csv")
    assert run(["-q", "fit", str(work / "done.yaml"), "--resume", "--set", "trainer.max_epochs=3",
                "--set", "data.num_workers=0"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "after epoch 2, with these changes to its recipe: trainer.max_epochs: 2 -> 3" in out
    assert yaml.safe_load((finished / "recipe.yaml").read_text())["trainer"]["max_epochs"] == 3
    assert ckpt(finished / "checkpoints" / "last.ckpt")["epoch"] == 2
    history = rows(finished / "logs" / "csv" / "metrics.csv")
    assert len(history) > len(logged)
    kept = [{k: v for k, v in r.items() if v} for r in history[:len(logged)]]
    assert kept == [{k: v for k, v in r.items() if v} for r in logged]  # the earlier rows, unchanged
    assert {r["epoch"] for r in history if r.get("val/accuracy")} >= {"0", "1", "2"}


def test_a_malicious_last_checkpoint_is_refused_before_lightning_loads_it(work, colours, capsys):
    path = recipe(work, "evil", colours, **TINY)
    (work / "runs" / "evil" / "checkpoints").mkdir(parents=True)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(work / "pwned"),))

    with open(work / "runs" / "evil" / "checkpoints" / "last.ckpt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    assert run(["-q", "fit", str(path), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"cannot read checkpoint {work / 'runs' / 'evil' / 'checkpoints' / 'last.ckpt'}" in err
    assert "weights_only" not in err and "Traceback" not in err and "start it again with --overwrite" in err
    assert not (work / "pwned").exists()


# ----------------------------------------------------------------------------- folders that are not the run's


def test_overwrite_deletes_only_a_run_directory(work, colours, capsys):
    mine = work / "runs" / "notes"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    assert run(["-q", "fit", str(recipe(work, "notes", colours, **TINY)), "--overwrite"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"--overwrite: {mine} is not a run directory made by effft fit" in err and "Traceback" not in err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


# ----------------------------------------------------------------------------- a full disk


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from effft.runs.writing import WholeCheckpoints

    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    WholeCheckpoints().save_checkpoint({"epoch": 0}, target)
    assert torch.load(target, weights_only=True) == {"epoch": 0}

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(EffftError) as caught:
        WholeCheckpoints().save_checkpoint({"epoch": 1}, target)
    message = str(caught.value)
    assert f"cannot write {target}" in message and f"The run in {tmp_path / 'run'} is unfinished" in message
    assert "--resume" in message and ".tmp" not in message
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"epoch": 0}  # the earlier checkpoint, whole
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary left


# ----------------------------------------------------------------------------- data that moved


def test_effft_test_after_the_data_moved_suggests_and_takes_the_new_place(finished, work, colours, capsys):
    moved = work / "colours_moved"
    shutil.move(str(colours), moved)
    try:
        assert run(["-q", "test", str(finished)]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"no longer at {colours}" in err and f"effft test {finished} --set data.root=" in err
        assert "Traceback" not in err
        assert run(["-q", "test", str(finished), "--set", f"data.root={moved}"]) == 0
        again = json.loads((finished / "tests" / "same_data" / "metrics.json").read_text())["test"]
        predicted = rows(finished / "tests" / "same_data" / "report" / "predictions.csv")
        test_split = [r["path"] for r in rows(finished / "splits.csv") if r["split"] == "test"]
        assert sorted(r["path"] for r in predicted) == sorted(p.replace(str(colours), str(moved)) for p in test_split)
        assert 0 <= again["accuracy"] <= 1
    finally:
        shutil.move(str(moved), colours)
