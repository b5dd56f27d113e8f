"""What every data adapter hands the rest of the pipeline.

An adapter module (`folder`, `csv`, `medmnist`, `dicom`, `face`) exposes
  - `Options`: a pydantic model of its recipe keys (`data.<adapter>.*`), and
  - `load(root: Path, options: Options, *, channels: int) -> Source`.
The pipeline after it (splits, transforms, cache, DataModule) only sees `Source`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Task = Literal["multiclass", "binary", "multilabel"]
SPLITS = ("train", "val", "test")


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

    @abstractmethod
    def read(self, item: Item, channels: int) -> np.ndarray:
        """The item's pixels as an HWC uint8 array with `channels` channels (1 or 3).

        Raises `effft.data.decode.BadImageError` (naming the path) when it cannot be read.
        """
