"""Two CPU processes under Lightning's DDP (gloo): the run completes, one process writes the
run directory, and the test metrics over both ranks equal a one-process evaluation of the same
checkpoint, on a test set whose size does not divide by two. The task is binary, so what the val
split decides after training (temperature, threshold, operating points) is decided under DDP too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_fit import COLOURS, make_folder, recipe

from effft.cli import run


def effft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "effft.cli", "-q", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_two_process_run_matches_one_process_evaluation(tmp_path):
    root = make_folder(tmp_path / "colours", ["blue", "red"], n=15, size=32)  # 30 images
    # 30 x 0.5 = 15 test images: the two ranks get 8 and 7
    path = recipe(tmp_path, "ddp", root, data={"split": {"train": 0.3, "val": 0.2, "test": 0.5}},
                  trainer={"max_epochs": 1, "accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    fitted = effft("fit", str(path), cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert "Traceback" not in fitted.stderr
    # the logged figures are whole-split ones: Lightning has nothing to warn of
    assert "sync_dist" not in fitted.stderr, fitted.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    splits = [line for line in (run_dir / "splits.csv").read_text().splitlines()[1:] if line.endswith(",test")]
    assert len(splits) == 15
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"val", "test", "intervals", "operating_points"}
    # one report, written once: no files of a second writer beside the first
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert [p.name for p in run_dir.glob("summary*.md")] == ["summary.md"]
    predictions = (run_dir / "report" / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + 15  # every test image once, none repeated to pad a rank
    assert len({line.split(",")[0] for line in predictions[1:]}) == 15

    tested = effft("test", str(run_dir), cwd=tmp_path)  # one process, the same checkpoint
    assert tested.returncode == 0, tested.stderr[-3000:]
    single = json.loads((run_dir / "tests" / "same_data" / "metrics.json").read_text())["test"]
    for name, value in metrics["test"].items():
        if value is None:
            assert single[name] is None, name
        else:
            assert single[name] == pytest.approx(value, abs=1e-6), name
    # the intervals of the gathered predictions equal those of one process (same seed)
    again = json.loads((run_dir / "tests" / "same_data" / "metrics.json").read_text())["intervals"]["test"]
    for name, ci in metrics["intervals"]["test"].items():
        assert (again[name]["low"], again[name]["high"]) == pytest.approx((ci["low"], ci["high"]), abs=1e-6), name
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["trainer"]["devices"] == 2


def test_a_failing_rank_ends_the_whole_job_with_a_message(tmp_path):
    # rank 1 alone fails at its first training step; nothing else may keep the job waiting
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('LOCAL_RANK') == '1':\n"
        "    import effft.train.module as m\n"
        "    def broken(self, batch, batch_idx):\n"
        "        raise RuntimeError('disk on fire on rank 1')\n"
        "    m.EffftModule.training_step = broken\n")
    root = make_folder(tmp_path / "colours", COLOURS, n=6, size=32)
    path = recipe(tmp_path, "ddpfail", root, trainer={"max_epochs": 3, "accelerator": "cpu", "devices": 2,
                                                      "strategy": "ddp"})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{hook}{os.pathsep}{env.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-m", "effft.cli", "-q", "fit", str(path)], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode != 0
    assert "disk on fire on rank 1" in result.stderr
    assert "error on rank" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_split_smaller_than_the_process_count_is_refused_before_anything_is_written(tmp_path, capsys):
    root = make_folder(tmp_path / "colours", COLOURS, n=8, size=32)  # 24 images: 2 for val
    path = recipe(tmp_path, "thin", root, data={"split": {"train": 0.8, "val": 0.08, "test": 0.12}},
                  trainer={"max_epochs": 1, "accelerator": "cpu", "devices": 3, "strategy": "ddp"})
    assert run(["-q", "fit", str(path)]) == 2  # refused before Lightning would start a process
    err = " ".join(capsys.readouterr().err.split())
    assert "the val split has 2 image(s) but the run has 3 processes" in err and "Traceback" not in err
    assert "run on 2 device(s) or fewer" in err
    assert not (tmp_path / "runs").exists()


def test_find_lr_on_several_processes_is_refused_before_anything_is_written(tmp_path, capsys):
    # the finder runs in the first process, Lightning's copy of the command would go on to train
    root = make_folder(tmp_path / "colours", COLOURS, n=6, size=32)
    path = recipe(tmp_path, "finder", root, trainer={"max_epochs": 1, "accelerator": "cpu", "devices": 2,
                                                     "strategy": "ddp"})
    assert run(["-q", "fit", str(path), "--find-lr"]) == 2  # refused before Lightning would start a process
    err = " ".join(capsys.readouterr().err.split())
    assert "--find-lr: the finder runs in one process, but the recipe's Trainer runs 2" in err
    assert "--set trainer.devices=1" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
