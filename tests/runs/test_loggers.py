"""The recipe's `loggers:` as Lightning's own loggers: MLflow's run read back with MLflow's own
client, W&B offline read back from its run file, and a clear refusal (exit 2, no run directory)
for an unknown name, a missing package and W&B without credentials."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import time
from pathlib import Path

import pytest
import yaml
from test_fit import make_folder, recipe

from effft.cli import run
from effft.config.load import load_recipe
from effft.runs.build import make_trainer, mlflow_store_uri

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path: Path, name: str, **sections) -> Path:
    """A one-epoch run on 3 x 8 generated 32 px images, random initialisation."""
    return recipe(tmp_path, name, make_folder(tmp_path / "data", ["blue", "green", "red"], n=8),
                  trainer={"max_epochs": 1, "accelerator": "cpu"}, **sections)


def close(logged: float, expected: float | None) -> bool:
    return math.isnan(logged) if expected is None else math.isclose(logged, expected, rel_tol=1e-6, abs_tol=1e-7)


def test_mlflow_store_in_the_run_directory_reads_back_as_metrics_json(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="pip install 'effft[track]'")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    path = tiny(tmp_path, "tracked", loggers=["mlflow"])
    assert run(["-q", "fit", str(path)]) == 0
    run_dir = tmp_path / "runs" / "tracked"
    assert (run_dir / "logs" / "mlflow" / "mlflow.db").is_file()
    assert not (run_dir / "logs" / "csv").exists() and not (run_dir / "logs" / "tensorboard").exists()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()  # nothing outside the run

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_store_uri(run_dir))
    experiment = client.get_experiment_by_name("effft")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == "tracked" and logged.info.status == "FINISHED"
    results = json.loads((run_dir / "metrics.json").read_text())
    for split in ("val", "test"):
        for name, value in results[split].items():
            assert close(logged.data.metrics[f"{split}/{name}"], value), (split, name)
    # the latest val/* are the figures of the best checkpoint, after one per epoch
    assert len(client.get_metric_history(logged.info.run_id, "val/accuracy")) >= 2
    assert logged.data.params["optimizer/lr"] == "0.003" and logged.data.params["data/image_size"] == "32"


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file: LevelDB's log format (32 KiB blocks of chunks, each
    with a 7-byte header: crc32, length, kind 1 full / 2 first / 3 middle / 4 last) after a 7-byte
    file header, each record one of W&B's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # a record still being written
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_wandb_offline_run_in_the_run_directory_holds_the_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install 'effft[track]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    path = tiny(tmp_path, "offline", loggers=["wandb", "csv"])
    assert run(["-q", "fit", str(path)]) == 0
    wandb.finish()  # as the end of the `effft` process would: W&B writes the rest of the run file
    run_dir = tmp_path / "runs" / "offline"
    assert (run_dir / "logs" / "csv" / "metrics.csv").is_file()
    (wandb_file,) = (run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    records, deadline = wandb_records(wandb_file), time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)  # W&B's own process may still be writing the file
        records = wandb_records(wandb_file)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started.display_name == "offline" and started.project == "effft"
    history: dict[str, float] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            # a key is in `key` or, as W&B 0.2x writes it, `nested_key` (one part for ours)
            history.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    results = json.loads((run_dir / "metrics.json").read_text())
    for split in ("val", "test"):
        for name, value in results[split].items():
            assert close(float(history[f"{split}/{name}"]), value), (split, name)


def test_no_loggers_makes_a_trainer_without_any(tmp_path):
    path = tiny(tmp_path, "silent", loggers=[])
    trainer = make_trainer(load_recipe(path), tmp_path / "runs" / "silent", task="multiclass",
                           classes=["blue", "green", "red"], quiet=True)
    assert trainer.loggers == []
    assert not any(type(c).__name__ == "LearningRateMonitor" for c in trainer.callbacks)
    assert not (tmp_path / "runs" / "silent").exists()


@pytest.mark.parametrize("loggers, says", [
    (["csv", "mlfow"], "loggers[1]: unknown logger: did you mean mlflow? the loggers are csv, tensorboard, mlflow, wandb"),
    (["csv", "csv"], "loggers: csv listed more than once"),
])
def test_unknown_or_repeated_logger_is_refused(tmp_path, capsys, loggers, says):
    path = tiny(tmp_path, "bad", loggers=loggers)
    assert run(["-q", "fit", str(path)]) == 2
    err = capsys.readouterr().err
    assert says in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_missing_tracker_package_names_the_extra(tmp_path, capsys, monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == name else real(module, *a))
    path = tiny(tmp_path, "untracked", loggers=["csv", name])
    assert run(["-q", "fit", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"loggers: {name} needs the {name} package" in err and "pip install 'effft[track]'" in err
    assert not (tmp_path / "runs" / "untracked").exists()
    # `effft info` checks the same before it reads any data
    assert run(["-q", "info", str(path)]) == 2


def test_wandb_without_credentials_is_refused_before_the_run_directory(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'effft[track]'")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    path = tiny(tmp_path, "online", loggers=["wandb"])
    assert run(["-q", "fit", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "wandb login" in err and "WANDB_MODE=offline" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "online").exists()


def test_default_loggers_are_csv_and_tensorboard(tmp_path):
    path = tiny(tmp_path, "plain")
    assert "loggers" not in yaml.safe_load(path.read_text())
    assert load_recipe(path).loggers == ["csv", "tensorboard"]
