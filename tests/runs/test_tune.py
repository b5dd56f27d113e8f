"""`effft tune`: a tiny study end to end (32 px colour folders, random initialisation), pruning of
a diverging trial, two processes sharing one SQLite study, `kill -9` and resume, and the refusals
of a bad search space or storage (exit 2, the key path or URL named, nothing changed)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from test_fit import csv_rows, make_folder, recipe

from effft.cli import run
from effft.config.load import load_recipe, read_yaml, search_space, validate
from effft.runs import tune
from effft.runs.tune import default_storage, open_study

EFFFT = [sys.executable, "-c", "from effft.cli import main; main()"]
SPACE = {"optimizer.lr": {"log_uniform": [1e-3, 1e-2]}, "loss.label_smoothing": {"choice": [0.0, 0.1]}}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tune")


@pytest.fixture(scope="module")
def colours(work) -> Path:
    return make_folder(work / "colours", ["blue", "green", "red"], n=6)


def _study(run_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=default_storage(run_dir))


def _searched(work: Path, name: str, colours: Path, **sections) -> Path:
    sections.setdefault("tune", SPACE)
    return recipe(work, name, colours, monitor={"metric": "val/loss"}, **sections)


# ----------------------------------------------------------------------------- end to end, pruning


@pytest.fixture(scope="module")
def searched(work, colours) -> Path:
    """Three trials: two ordinary ones, then one whose learning rate makes it diverge (each queued
    in the study first, as `study.enqueue_trial` lets a user try a value first)."""
    path = _searched(work, "tiny", colours, trainer={"max_epochs": 3, "accelerator": "cpu"})
    rec = load_recipe(path)
    run_dir = rec.run_dir
    run_dir.mkdir(parents=True)
    study = open_study(rec, default_storage(run_dir), space=search_space(rec, source=str(path)),
                       metric="val/loss", direction="min")
    for lr in (3e-3, 5e-3, 1e4):
        study.enqueue_trial({"optimizer.lr": lr, "loss.label_smoothing": 0.0}, skip_if_exists=False)
    # an lr of 1e4 is outside the recipe's range: Optuna warns that an enqueued value lies outside it
    with pytest.warns(UserWarning, match="out of range"):
        assert run(["-q", "tune", str(path), "--trials", "3"]) == 0
    return run_dir


def test_a_diverging_trial_is_pruned_before_its_last_epoch(searched):
    trials = _study(searched, "tiny").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    diverged = trials[2]
    assert diverged.params["optimizer.lr"] == 1e4
    assert diverged.user_attrs["epochs_run"] < diverged.user_attrs["epochs_planned"] == 3
    row = csv_rows(searched / "trials.csv")[2]
    assert row["state"] == "PRUNED" and int(row["epochs_run"]) < 3


def test_the_best_trial_is_chosen_on_val_and_alone_tested(searched):
    facts = json.loads((searched / "tune.json").read_text())
    val = {n: json.loads((searched / "trials" / str(n) / "metrics.json").read_text())["val"]["loss"] for n in (0, 1)}
    best = min(val, key=val.get)
    assert facts["best"]["trial"] == best and facts["best"]["val"] == pytest.approx(val[best])
    assert not (searched / "trials" / "2" / "metrics.json").exists()  # pruned: no result
    for n in (0, 1, 2):
        if n < 2:
            trial = json.loads((searched / "trials" / str(n) / "metrics.json").read_text())
            assert "test" not in trial  # no trial looked at the test split
        assert (searched / "trials" / str(n) / "tests").exists() == (n == best)
        assert (searched / "trials" / str(n) / "checkpoints").exists() == (n == best)
    tested = json.loads((searched / "trials" / str(best) / "tests" / "same_data" / "metrics.json").read_text())
    assert facts["best"]["test"]["accuracy"] == pytest.approx(tested["test"]["accuracy"])
    assert facts["pruning"]["pruned"] == 1 and facts["pruning"]["seconds_saved"] > 0
    summary = (searched / "summary.md").read_text()
    assert f"## Best trial: {best}" in summary and "(history.png)" in summary and "[best.yaml](best.yaml)" in summary
    assert (searched / "history.png").stat().st_size > 0


def test_best_yaml_is_a_recipe_that_fit_runs_as_it_is(searched, work, capsys):
    best = yaml.safe_load((searched / "best.yaml").read_text())
    facts = json.loads((searched / "tune.json").read_text())
    assert best["optimizer"]["lr"] == pytest.approx(facts["best"]["params"]["optimizer.lr"])
    assert best["name"] == "tiny-best" and "tune" not in best
    assert run(["info", str(searched / "best.yaml")]) == 0
    assert run(["-q", "fit", str(searched / "best.yaml"), "--set", "trainer.max_epochs=1"]) == 0
    assert (work / "runs" / "tiny-best" / "checkpoints" / "best.ckpt").exists()


def test_the_same_command_again_adds_nothing_to_a_finished_study(searched, work, capsys):
    before = len(_study(searched, "tiny").trials)
    assert run(["-q", "tune", str(work / "tiny.yaml"), "--trials", "3"]) == 0
    assert "3 finished trials already" in capsys.readouterr().out
    assert len(_study(searched, "tiny").trials) == before


# ----------------------------------------------------------------------------- processes


def _start(path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*EFFFT, "-q", "tune", str(path), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_two_processes_share_one_study(work, colours):
    path = _searched(work, "shared", colours, trainer={"max_epochs": 1, "accelerator": "cpu"})
    procs = [_start(path, "--trials", "4") for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = _study(work / "runs" / "shared", "shared").trials
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))) and len(trials) >= 4  # none duplicated, none lost
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), outs
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both processes ran trials of the one study
    for t in trials:
        assert (work / "runs" / "shared" / "trials" / str(t.number) / "recipe.yaml").exists()
        assert (work / "runs" / "shared" / "trials" / str(t.number) / "metrics.json").exists() == (t.state == TrialState.COMPLETE)


def test_kill_9_during_a_trial_loses_only_that_trial(work, colours):
    path = _searched(work, "killed", colours, trainer={"max_epochs": 1, "accelerator": "cpu"})
    db = work / "runs" / "killed" / "tune.db"
    proc = _start(path, "--trials", "3")
    deadline = time.monotonic() + 240
    first = None
    while time.monotonic() < deadline and proc.poll() is None:
        rows = []
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=30) as con:
                    rows = con.execute("SELECT number, state, datetime_complete FROM trials ORDER BY number").fetchall()
                    # the second trial has recorded its process and is about to fit: killed at once, well
                    # before its fit can end (a fixed sleep raced a fast machine's one-epoch fit)
                    fitting = con.execute(
                        "SELECT 1 FROM trial_user_attributes a JOIN trials t ON a.trial_id = t.trial_id "
                        "WHERE t.number = 1 AND a.key = 'epochs_planned'").fetchall()
            except sqlite3.OperationalError:  # its tables not made yet
                fitting = []
            if len(rows) >= 2 and rows[0][1] == "COMPLETE" and rows[1][1] == "RUNNING" and fitting:
                first = rows[0]
                break
        time.sleep(0.05)
    assert first is not None, proc.communicate()[0] if proc.poll() is not None else "trial 2 never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = _start(path, "--trials", "3")
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert "marked failed, and run again with the same values" in " ".join(out.split())
    trials = _study(work / "runs" / "killed", "killed").trials
    assert trials[0].state == TrialState.COMPLETE and str(trials[0].datetime_complete) == first[2]  # kept
    assert trials[1].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == trials[1].params and retried[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("space, named", [
    ({"optimizer.lrr": {"log_uniform": [1e-4, 1e-2]}}, "did you mean optimizer.lr"),
    ({"optimizer.lr": {"uniform": [0.0, 1e-2]}}, "tune.optimizer.lr: the value 0.0"),
    ({"loss.label_smoothing": {"uniform": [0.0, 1.5]}}, "tune.loss.label_smoothing: the value 1.5"),
    ({"trainer.max_epochs": {"uniform": [1, 5]}}, "tune.trainer.max_epochs"),
    ({"finetune.strategy": {"choice": []}}, "finetune.strategy: choice is empty"),
    ({"finetune.strategy": {"choice": ["full", "bogus"]}}, "tune.finetune.strategy: the value 'bogus'"),
    ({"optimizer.lr": {"log_uniform": [0, 1e-2]}}, "optimizer.lr: log_uniform needs low above 0"),
    ({"optimizer.lr": [1e-4, 1e-2]}, "optimizer.lr: expected one of log_uniform"),
    ({"name": {"choice": ["a", "b"]}}, "name says what the run is"),
])
def test_a_bad_search_space_is_refused_naming_the_key(work, colours, capsys, space, named):
    path = _searched(work, "bad-space", colours, tune=space)
    assert run(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in " ".join(err.split()) and "Traceback" not in err
    assert not (work / "runs" / "bad-space").exists()  # nothing written


@pytest.fixture
def plain(work, colours) -> Path:
    return _searched(work, "storage", colours)


def test_a_malformed_storage_url_is_refused(plain, capsys):
    assert run(["tune", str(plain), "--storage", "not a url"]) == 2
    assert "--storage 'not a url' is not a database URL" in capsys.readouterr().err


def test_an_unreachable_server_is_refused_naming_it(plain, capsys):
    url = "postgresql://nobody:secret@127.0.0.1:9/nothing"
    assert run(["tune", str(plain), "--storage", url]) == 2
    assert f"--storage {url}" in " ".join(capsys.readouterr().err.split())


def test_a_file_that_is_not_a_database_is_left_alone(plain, work, capsys):
    notes = work / "notes.db"
    notes.write_text("my notes, not a database\n" * 100)
    assert run(["tune", str(plain), "--storage", f"sqlite:///{notes}"]) == 2
    assert "is not an SQLite database" in capsys.readouterr().err
    assert notes.read_text() == "my notes, not a database\n" * 100


def test_an_sqlite_database_of_something_else_is_left_alone(plain, work, capsys):
    other = work / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE patients (id INTEGER)")
    before = other.read_bytes()
    assert run(["tune", str(plain), "--storage", f"sqlite:///{other}"]) == 2
    assert "not one Optuna made" in capsys.readouterr().err
    assert other.read_bytes() == before


def test_a_study_made_by_another_recipe_is_left_alone(work, colours, capsys):
    first = load_recipe(_searched(work, "twice", colours))
    url = f"sqlite:///{work / 'twice.db'}"
    study = open_study(first, url, space=search_space(first, source="first"), metric="val/loss", direction="min")
    study.enqueue_trial({"optimizer.lr": 2e-3, "loss.label_smoothing": 0.0})
    other = _searched(work, "twice", colours, tune={"optimizer.lr": {"log_uniform": [1e-4, 1e-3]}})
    assert run(["tune", str(other), "--storage", url]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--storage {url}: its study 'twice' was made by another recipe" in err
    assert [t.state for t in optuna.load_study(study_name="twice", storage=url).trials] == [TrialState.WAITING]


def test_a_recipe_whose_trainer_runs_several_processes_is_refused_before_a_study_is_made(work, colours, capsys):
    # under DDP each copy of the command would draw trials of its own: the job would hang
    path = _searched(work, "ddp", colours, trainer={"max_epochs": 1, "accelerator": "cpu", "devices": 2,
                                                    "strategy": "ddp"})
    assert run(["tune", str(path), "--trials", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "runs 2 processes" in err and "set trainer.devices: 1" in err and "Traceback" not in err
    assert not (work / "runs" / "ddp").exists()


def test_the_default_space_is_valid_for_every_shipped_recipe():
    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        rec = validate(read_yaml(path), source=str(path))
        keys = [p.path for p in search_space(rec, source=str(path))]
        assert "optimizer.lr" in keys


def test_a_study_another_process_is_making_is_waited_for_not_refused(work, colours):
    """Two processes started together: one makes the study, and sets its search space and metric
    a moment later; the other, seeing the study without them, waits for them."""
    import threading

    path = _searched(work, "racing", colours)
    rec = load_recipe(path)
    rec.run_dir.mkdir(parents=True)
    url = default_storage(rec.run_dir)
    space, metric = search_space(rec, source=str(path)), "val/loss"
    made = optuna.create_study(storage=url, study_name=rec.name)  # as the first process has, just now
    wanted = {p.path: p.to_dict() for p in space}

    def finish_making() -> None:
        time.sleep(0.5)
        made.set_user_attr(tune.SPACE_ATTR, wanted)
        made.set_user_attr(tune.METRIC_ATTR, metric)

    maker = threading.Thread(target=finish_making)
    maker.start()
    study = open_study(rec, url, space=space, metric=metric, direction="min")
    maker.join()
    assert study.study_name == rec.name and study.user_attrs[tune.SPACE_ATTR] == wanted
