"""How a run's files are written while it trains: checkpoints whole or not at all, and a metrics
log that a resumed run continues instead of starting afresh.

Lightning's own checkpoint writer writes straight into `best.ckpt` / `last.ckpt`: a full disk or
a crash while saving leaves a truncated file in place of the good one. Lightning's CSV logger
deletes `metrics.csv` when it starts, so each `--resume` lost the rows of the epochs before.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins import TorchCheckpointIO

from ..errors import EffftError
from ..paths import atomic_write
from .layout import run_dir_of


class WholeCheckpoints(TorchCheckpointIO):
    """Lightning's checkpoint writer, each file written through `paths.atomic_write`: readers
    (and a later --resume) see the previous checkpoint or the whole new one, never a part."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("effft's checkpoint writer takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # written by Python below, so a full disk is an OSError naming the file
        torch.save(checkpoint, buffer)
        try:
            with atomic_write(path) as tmp:
                tmp.write_bytes(buffer.getbuffer())
        except EffftError as exc:  # the disk is full
            raise EffftError(f"{exc} The run in {run_dir_of(path)} is unfinished and its earlier checkpoints are "
                             "whole: once there is space, continue it with `effft fit` and --resume.") from None


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning's deletes an existing metrics.csv here. Keep it, and its columns, so that the
        # rows written now are appended under the same header (or the file is rewritten with more
        # columns, as Lightning does when new metrics appear).
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as f:
                self.metrics_keys = next(csv.reader(f), [])


class HistoryCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to its `metrics.csv`."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_history(metrics_csv: Path, *, step: int) -> None:
    """Drop the rows logged after training step `step`, where a resumed run starts again: they
    belong to the part of an interrupted epoch that no checkpoint kept, and will be logged anew."""
    if not metrics_csv.is_file():
        return
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)

    def later(row: dict[str, str]) -> bool:
        try:
            return int(float(row.get("step") or -1)) > step
        except ValueError:
            return False

    kept = [row for row in rows if not later(row)]
    if len(kept) == len(rows):
        return
    with atomic_write(metrics_csv) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)
