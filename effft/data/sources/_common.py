"""What every data adapter hands the rest of the pipeline, and the pieces adapters share.

An adapter module (`folder`, `csv`, `medmnist`, `dicom`, `face`) exposes
  - `Options`: a pydantic model of its recipe keys (`data.<adapter>.*`), and
  - `load(root: Path, options: Options, *, channels: int) -> Source`.
The pipeline after it (splits, transforms, cache, DataModule) only sees `Source`.

Shared here: the one folder walk (`subfolders`, `files_under`), the one CSV reader
(`read_table`, `column`) and the one table of split names (`SPLIT_ALIASES`).
"""

from __future__ import annotations

import csv
import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from ...errors import EffftError
from ..decode import read_image

Task = Literal["multiclass", "binary", "multilabel"]
SPLITS = ("train", "val", "test")
# How a split may be written, in a folder name or a CSV cell (lower case), and the split it means.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class Item:
    """One image of a data set."""

    path: str  # the file; for images inside one array file: "<file>::<split>/<index>"
    target: int | tuple[int, ...]  # class index, or a 0/1 tuple per class for multi-label
    group: str | None = None  # patient or person: a group never spans two splits
    split: str | None = None  # "train" | "val" | "test" where the data set fixes it
    frame: int | None = None  # which frame of a multi-frame file


@dataclass(frozen=True)
class BadFile:
    """A file that could not be used, and why (shown to the user, written to the run)."""

    path: str
    reason: str


@dataclass
class Source(ABC):
    """A data set: its items, class names, task, files found unusable, and how to read one."""

    items: list[Item]
    classes: list[str]
    task: Task
    bad: list[BadFile] = field(default_factory=list)
    in_memory: ClassVar[bool] = False  # the images are arrays already (reading one decodes nothing)

    @abstractmethod
    def read(self, item: Item, channels: int) -> np.ndarray:
        """The item's pixels as an HWC uint8 array with `channels` channels (1 or 3).

        Raises `effft.data.decode.BadImageError` (naming the path) when it cannot be read.
        """


@dataclass
class FileSource(Source):
    """Images read from files, one per item (the folder and csv adapters)."""

    def read(self, item: Item, channels: int) -> np.ndarray:
        return read_image(item.path, channels=channels)


def task_of(classes: list[str]) -> Task:
    """binary for two classes, multiclass for more (single-label data)."""
    return "binary" if len(classes) == 2 else "multiclass"


# --- folders ----------------------------------------------------------------------------------


def subfolders(folder: Path) -> list[Path]:
    """The visible sub-folders of `folder`, sorted by name (class, person or split folders)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def files_under(folder: Path, wanted: Callable[[Path], bool]) -> tuple[list[Path], int]:
    """The files under `folder` (recursive, sorted) that `wanted` accepts, and how many others
    there are. Hidden files and folders are passed over. Links to missing files are offered to
    `wanted` too, so that an adapter can report them by path rather than lose them."""
    found, others = [], 0
    for p in sorted(folder.rglob("*")):
        broken_link = p.is_symlink() and not p.exists()
        if any(part.startswith(".") for part in p.relative_to(folder).parts) or not (p.is_file() or broken_link):
            continue
        if wanted(p):
            found.append(p)
        else:
            others += 1
    return found, others


# --- tables -----------------------------------------------------------------------------------


def read_table(path: Path, *, delimiter: str | None = None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line, cells)]) of a CSV or TSV file; lines count as an editor shows them (the
    header is line 1), blank lines are passed over, cells are stripped. The delimiter is sniffed
    where not given (tab for .tsv)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise EffftError(f"cannot read CSV file {path}: {e}") from e
    reader = csv.reader(text.splitlines(keepends=True), delimiter=_delimiter(path, text, delimiter))
    rows = []
    header = None
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [c.strip() for c in row]
            continue
        rows.append((reader.line_num, [c.strip() for c in row]))
    if header is None:
        raise EffftError(f"CSV file {path} is empty: it needs a header row and one row per image")
    if not rows:
        raise EffftError(f"CSV file {path} has a header but no rows")
    return header, rows


def _delimiter(path: Path, text: str, given: str | None) -> str:
    if given is not None:
        return given
    if path.suffix.lower() == ".tsv":
        return "\t"
    try:
        return csv.Sniffer().sniff(text[:65536], delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def column(header: list[str], name: str, *, key: str, path: Path) -> int:
    """The index of column `name`; a missing one is an error naming the file, the recipe `key`
    that named it, the columns there are and the closest."""
    if name in header:
        return header.index(name)
    close = difflib.get_close_matches(name, header, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise EffftError(f"{path} has no column {name!r} ({key}); its columns are {header}{hint}")


def cell(row: list[str], index: int, *, line: int, header: list[str], path: Path, key: str) -> str:
    """The cell at `index` of a row; a short row is an error naming the line."""
    if index >= len(row):
        raise EffftError(f"{path} line {line} has {len(row)} cells, fewer than the header's "
                         f"{len(header)}: fix the row or the delimiter ({key})")
    return row[index]


def split_name(value: str, *, line: int, path: Path) -> str | None:
    """A split cell (train, val, test or another spelling of them) as its split; empty: None."""
    if not value:
        return None
    split = SPLIT_ALIASES.get(value.lower())
    if split is None:
        raise EffftError(f"{path} line {line}: split {value!r} is not one of train, val, test")
    return split
