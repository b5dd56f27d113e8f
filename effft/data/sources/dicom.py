"""The `dicom` adapter: DICOM files in class folders, or listed in a CSV.

    root/<class>/**/<file>       files named *.dcm / *.dicom, or without a suffix (DICM magic)
    root/<csv>                   columns path (relative to root), label, and optionally
                                 group and split (train / val / test)

The patient (PatientID, read from each file's header) is the item's group, so that a grouped
split never puts one patient's images in both training and test data; a `group` column in
the CSV takes precedence. Every file's header is read at load time: files that are not
DICOM, hold no image, or lack the requested frame are listed in `source.bad` (and not used),
so a broken export is found before training starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ...console import console
from ...errors import EffftError
from ..decode import DICOM_SUFFIXES, BadImageError, DicomWindow, has_dicom_magic, read_dicom_header, read_image
from ._common import BadFile, Item, Source, column, files_under, read_table, split_name, subfolders, task_of

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Options(BaseModel):
    """Keys of `data.dicom`."""

    model_config = ConfigDict(extra="forbid")

    csv: str | None = None
    """A CSV listing the files (path relative to data.root); without it: class folders."""
    path_column: str = "path"
    label_column: str = "label"
    group_column: str = "group"
    """Used when the CSV has it: the item's group (else the file's PatientID)."""
    split_column: str = "split"
    """Used when the CSV has it: train / val / test per row."""
    window_center: float | None = None
    """VOI window in modality units (HU for CT); with window_width. None: the file's own."""
    window_width: float | None = None
    frame: int | None = None
    """Frame of multi-frame files (0-based; single-frame files ignore it). None: the middle."""
    group_by_patient: bool = True
    """Group items by the file's PatientID so a patient never spans two splits."""

    @model_validator(mode="after")
    def _window_pair(self) -> Options:
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("set both window_center and window_width, or neither")
        if self.window_width is not None and self.window_width <= 0:
            raise ValueError(f"window_width must be positive, got {self.window_width}")
        if self.frame is not None and self.frame < 0:
            raise ValueError(f"frame must be 0 or more, got {self.frame}")
        return self

    @property
    def window(self) -> DicomWindow:
        return DicomWindow(center=self.window_center, width=self.window_width)


@dataclass
class DicomSource(Source):
    """DICOM files, each windowed and scaled to 8 bits on reading."""

    window: DicomWindow = field(default_factory=DicomWindow)

    def read(self, item: Item, channels: int) -> np.ndarray:
        return read_image(item.path, channels=channels, window=self.window, frame=item.frame)


@dataclass(frozen=True)
class Header:
    """What the adapter takes from a file's DICOM header."""

    patient: str | None  # PatientID (0010,0020), None when absent or empty
    frames: int  # NumberOfFrames, 1 for a single image


def header(path: str) -> Header:
    """The patient and frame count of a DICOM file (`BadImageError` when it is no DICOM image)."""
    ds = read_dicom_header(path)
    patient = str(ds.get("PatientID", "") or "").strip() or None
    return Header(patient=patient, frames=int(ds.get("NumberOfFrames", 1) or 1))


def _parallel(fn: Callable[[str], _T], paths: Sequence[str], what: str) -> list[_T]:
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        results = pool.map(fn, paths)
        if len(paths) <= 200:
            return list(results)
        out = []
        with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task(what, total=len(paths))
            for r in results:
                out.append(r)
                bar.advance(task)
        return out


def _safe_header(path: str) -> Header | BadFile:
    try:
        if os.path.getsize(path) == 0:
            return BadFile(path, "empty file (0 bytes)")
        return header(path)
    except BadImageError as e:
        return BadFile(path, e.reason)
    except OSError as e:
        return BadFile(path, f"cannot open the file ({e.strerror or e})")


def is_dicom_file(path: Path) -> bool:
    """A .dcm / .dicom file, or a suffix-less one with the DICM marker (hidden files: no)."""
    if path.name.startswith(".") or not path.is_file():
        return False
    suffix = path.suffix.lower()
    return suffix in DICOM_SUFFIXES or (not suffix and has_dicom_magic(path))


@dataclass
class _Row:
    path: str
    label: str
    group: str | None = None
    split: str | None = None


def _rows_from_folders(root: Path) -> list[_Row]:
    class_dirs = subfolders(root)
    if not class_dirs:
        raise EffftError(f"{root} has no class folders: put each class's DICOM files in a "
                         f"sub-folder named after it (e.g. {root}/normal/IM0001.dcm), or "
                         "list them in a CSV with data.dicom.csv")
    rows = []
    for d in class_dirs:
        files, _ = files_under(d, is_dicom_file)
        if not files:
            raise EffftError(f"class folder {d} holds no DICOM files (*.dcm, *.dicom, or files "
                             "without a suffix that start with the DICOM marker): add them, "
                             "or remove the folder")
        rows += [_Row(path=str(p), label=d.name) for p in files]
    return rows


def _rows_from_csv(root: Path, options: Options) -> list[_Row]:
    table = Path(options.csv).expanduser()  # type: ignore[arg-type]
    table = table if table.is_absolute() else root / table
    if not table.is_file():
        raise EffftError(f"data.dicom.csv: {table} does not exist (a relative path is read "
                         f"from data.root {root})")
    header, lines = read_table(table, delimiter=",")
    where = {key: column(header, getattr(options, key), key=f"data.dicom.{key}", path=table)
             for key in ("path_column", "label_column")}
    optional = {key: header.index(getattr(options, key)) for key in ("group_column", "split_column")
                if getattr(options, key) in header}
    rows = []
    for line, cells in lines:
        def at(key: str) -> str:
            index = where.get(key, optional.get(key))
            return "" if index is None or index >= len(cells) else cells[index]

        path, label = at("path_column"), at("label_column")
        if not path or not label:
            raise EffftError(f"{table} line {line}: empty {options.path_column!r} or "
                             f"{options.label_column!r}: fill it in or remove the row")
        full = Path(path).expanduser()
        rows.append(_Row(path=str(full if full.is_absolute() else root / full), label=label,
                         group=at("group_column") or None,
                         split=split_name(at("split_column"), line=line, path=table)))
    return rows


def load(root: Path, options: Options, *, channels: int) -> Source:
    """Items from class folders of DICOM files under `root`, or from `options.csv`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise EffftError(f"DICOM data folder {root} does not exist or is not a folder: set "
                         "data.root to the folder holding one sub-folder per class (or the CSV)")
    rows = _rows_from_csv(root, options) if options.csv else _rows_from_folders(root)
    headers = _parallel(_safe_header, [r.path for r in rows], "reading DICOM headers")
    classes = sorted({r.label for r in rows})
    if len(classes) < 2:
        raise EffftError(f"{root}: only one class ({classes[0]!r}); a classifier needs at "
                         "least two: add files of the other class(es)")
    items, bad, no_patient = [], [], 0
    for row, head in zip(rows, headers):
        if isinstance(head, BadFile):
            bad.append(head)
            continue
        if options.frame is not None and 1 < head.frames <= options.frame:
            bad.append(BadFile(row.path, f"frame {options.frame} asked for (data.dicom.frame), "
                                         f"but the file has {head.frames} frame(s)"))
            continue
        group = row.group or (head.patient if options.group_by_patient else None)
        no_patient += options.group_by_patient and group is None
        items.append(Item(path=row.path, target=classes.index(row.label), group=group,
                          split=row.split, frame=options.frame if head.frames > 1 else None))
    if not items:
        raise EffftError(f"no readable DICOM files under {root}: {len(bad)} file(s) failed, "
                         f"e.g. {bad[0].path}: {bad[0].reason}")
    empty = sorted(set(classes) - {classes[i.target] for i in items})  # type: ignore[index]
    if empty:
        raise EffftError(f"class(es) {empty} under {root} have no readable DICOM file "
                         f"({len(bad)} unreadable, e.g. {bad[0].path}: {bad[0].reason}): "
                         "fix or replace the files")
    if bad:
        log.warning("%d DICOM file(s) under %s cannot be used, e.g. %s: %s",
                    len(bad), root, bad[0].path, bad[0].reason)
    if no_patient:
        log.warning("%d DICOM file(s) have no PatientID: each is its own group when splitting",
                    no_patient)
    task = task_of(classes)
    return DicomSource(items=items, classes=classes, task=task, bad=bad, window=options.window)
