"""The data set of a run: the adapter's items with unreadable files found and left out, split.

`load_data(cfg, ...)` is the first step of every command that reads a data set. It loads the
adapter, scans every file (a corrupt image is named by path, never passed over) and splits the
rest, by the data set's own split, a `splits.csv` of an earlier run, or `data.split`. What it
returns knows its classes, task and counts; the DataModule turns it into batches.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import EffftError
from ..paths import atomic_write
from .decode import image_size
from .scan import format_bad_files, scan
from .sources import adapter
from .sources._common import SPLITS, BadFile, Item, Source, Task
from .splits import apply_splits, assign_splits, read_splits, strata, write_splits

if TYPE_CHECKING:
    from ..config.schema import DataConfig

log = logging.getLogger(__name__)

SIZE_SAMPLE = 200  # images whose size `summary()` reads


@dataclass
class LoadedData:
    """A data set ready for splitting into batches: its items (each with its split), the files
    left out as unreadable, and how to read an item (`source`)."""

    cfg: DataConfig
    source: Source
    items: list[Item]
    channels: int
    bad: list[BadFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the split was made, where readers must know

    @property
    def classes(self) -> list[str]:
        return list(self.source.classes)

    @property
    def task(self) -> Task:
        return self.source.task

    @property
    def num_classes(self) -> int:
        return len(self.source.classes)

    def split_items(self, split: str) -> list[Item]:
        """The items of `split`, in the order batches index them."""
        return [it for it in self.items if it.split == split]

    def class_counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: items}} (multi-label: items with that label)."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            targets = [it.target for it in self.split_items(split)]
            if self.task == "multilabel":
                sums = np.sum(targets, axis=0) if targets else np.zeros(len(self.classes))
                out[split] = {c: int(n) for c, n in zip(self.classes, sums)}
            else:
                n = Counter(targets)
                out[split] = {c: n.get(i, 0) for i, c in enumerate(self.classes)}
        return out

    # ------------------------------------------------------------------ imbalance

    def sample_weights(self) -> torch.Tensor:
        """Per train item 1 / (items of its class): classes drawn evenly (multi-label: by
        each item's rarest label)."""
        y = strata(self.split_items("train"))
        counts = Counter(y.tolist())
        return torch.tensor([1.0 / counts[v] for v in y.tolist()], dtype=torch.double)

    def class_weights(self) -> torch.Tensor:
        """Inverse class frequency in the train split, mean 1 over the classes present there
        (a class without training items gets 0). Multi-label: by positives per label."""
        counts = torch.tensor(list(self.class_counts()["train"].values()), dtype=torch.float32)
        present = counts > 0
        w = torch.zeros_like(counts)
        w[present] = 1.0 / counts[present]
        return w / w[present].mean()

    def pos_weight(self) -> torch.Tensor:
        """negatives / positives per label in the train split (1 where a label has no
        positives); for binary data, one value for the second class."""
        n = len(self.split_items("train"))
        pos = torch.tensor(list(self.class_counts()["train"].values()), dtype=torch.float32)
        if self.task == "binary":
            pos = pos[1:]
        elif self.task != "multilabel":
            raise ValueError("pos_weight is for binary and multi-label data")
        return torch.where(pos > 0, (n - pos) / pos.clamp(min=1), torch.ones_like(pos))

    # ------------------------------------------------------------------ reports

    def image_size_stats(self, sample: int = SIZE_SAMPLE) -> dict[str, Any]:
        """min / median / max of width and height over an evenly spaced sample of items."""
        items = self.items[:: max(1, len(self.items) // sample)][:sample]
        sizes = []
        for it in items:
            try:
                if "::" in it.path or it.frame is not None:
                    h, w = self.source.read(it, self.channels).shape[:2]
                else:
                    w, h = image_size(it.path)
            except EffftError as e:
                log.debug("size of %s unknown: %s", it.path, e)
                continue
            sizes.append((w, h))
        if not sizes:
            return {"sampled": 0}
        a = np.array(sizes)
        stats = {k: {"min": int(a[:, j].min()), "median": float(np.median(a[:, j])),
                     "max": int(a[:, j].max())} for j, k in enumerate(("width", "height"))}
        return {"sampled": len(sizes), **stats}

    def summary(self) -> dict[str, Any]:
        """Classes, items per split and class, image sizes, bad files: for `effft info`."""
        counts = self.class_counts()
        return {
            "adapter": self.cfg.adapter,
            "root": str(self.cfg.root),
            "task": self.task,
            "classes": self.classes,
            "items": {s: len(self.split_items(s)) for s in SPLITS},
            "counts": counts,
            "image_size": self.image_size_stats(),
            "bad_files": [{"path": b.path, "reason": b.reason} for b in self.bad],
            # the face adapter's photos where no face was found (used whole, or left out)
            "no_face": [{"path": b.path, "reason": b.reason}
                        for b in getattr(self.source, "no_face_files", [])],
        }

    def write_run_files(self, run_dir: Path) -> None:
        """splits.csv, classes.json and bad_files.csv in `run_dir`."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_splits(run_dir / "splits.csv", self.items, self.classes)
        with atomic_write(run_dir / "classes.json") as tmp:
            tmp.write_text(json.dumps({"classes": self.classes, "task": self.task}, indent=2))
        write_bad_files(run_dir / "bad_files.csv", self.bad)


def write_bad_files(path: Path, bad: list[BadFile]) -> None:
    """`bad_files.csv`: path, reason (a header only when there are none)."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows([b.path, b.reason] for b in bad)


def load_data(cfg: DataConfig, *, channels: int, seed: int, splits_file: Path | None = None,
              test_only: bool = False, progress: bool = True, positive_class: str | None = None,
              positive_key: str = "metrics.positive_class", scan_files: bool = True) -> LoadedData:
    """Load the adapter, leave out the unreadable files (or refuse them) and split: as
    `splits_file` says, or the data set itself, or `cfg.split`; with `test_only` every item is
    test data (a trained model evaluated on other data). Binary data are ordered with the
    positive class second (`data/positive.py`): `positive_class`, given by `positive_key`, or
    the class whose name says it. Without `scan_files` no file is decoded here: the caller
    reads each and deals with those that fail."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    source = adapter(cfg.adapter).load(cfg.root, cfg.options, channels=channels)
    source = _positive_second(source, cfg, positive_class, positive_key)
    bad = list(source.bad)
    if scan_files:
        bad += scan(sorted({it.path for it in source.items if "::" not in it.path}), progress=progress)
    items = _drop_bad(source, bad, cfg)
    if test_only:
        items = [replace(it, split="test") for it in items]
    elif splits_file is not None:
        items = apply_splits(items, read_splits(splits_file), source=splits_file)
    else:
        items = assign_splits(items, cfg.split, seed=seed)
    data = LoadedData(cfg=cfg, source=source, items=items, channels=channels, bad=bad, notes=_split_notes(source, cfg))
    if not test_only:
        _check_splits(data)
    return data


def _positive_second(source: Source, cfg: DataConfig, given: str | None, key: str) -> Source:
    """The source with its positive class second (binary data; others as they are)."""
    from ..errors import RecipeError
    from .positive import positive_index

    if given is not None and source.task != "binary":
        raise RecipeError(f"{key} is {given!r}, but the data at {cfg.root} have {len(source.classes)} "
                          f"classes ({', '.join(source.classes)}): a positive class is for two-class data; "
                          f"remove {key}")
    if source.task != "binary":
        return source
    if given is not None and given not in source.classes:
        raise RecipeError(f"{key} is {given!r}, which is not a class of the data at {cfg.root}: "
                          f"the classes are {', '.join(repr(c) for c in source.classes)}")
    index, why = positive_index(list(source.classes), given)
    log.info("positive class: %r (%s)%s", source.classes[index], why,
             "" if given is not None else "; metrics.positive_class names another")
    if index == 1:
        return source
    items = [replace(it, target=1 - int(it.target)) for it in source.items]  # type: ignore[arg-type]
    return replace(source, items=items, classes=[source.classes[1], source.classes[0]])


def _split_notes(source: Source, cfg: DataConfig) -> list[str]:
    given = {it.split for it in source.items}
    if cfg.split.by == "identity":
        return ["Split by person (data.split.by: identity): the people of val and test were never seen in "
                "training."]
    if given != {"train", "val"} or cfg.split.folds is not None:
        return []
    if cfg.split.own_val:
        return ["The data have train and val splits but no test split: their val split is reported here as "
                "the test split, and effft's validation (which chose the checkpoint, threshold and temperature) "
                "was cut from their train split."]
    return ["OPTIMISTIC: the data's val split chose the checkpoint, threshold and temperature and is also the "
            "split reported (data.split.own_val: false)."]


def _drop_bad(source: Source, bad: list[BadFile], cfg: DataConfig) -> list[Item]:
    if not bad:
        return list(source.items)
    summary = format_bad_files(bad)
    if cfg.on_bad_file == "error":
        raise EffftError(f"{summary}\nFix or remove these files, or set data.on_bad_file: "
                         "skip to train without them")
    log.warning("%s\nThese are left out (data.on_bad_file: skip); the run lists them in bad_files.csv", summary)
    gone = {os.path.normpath(b.path) for b in bad}
    items = [it for it in source.items if os.path.normpath(it.path) not in gone]
    if not items:
        raise EffftError(f"every file of the data set at {cfg.root} is unreadable")
    return items


def _check_splits(data: LoadedData) -> None:
    if not data.split_items("train"):
        raise EffftError("the train split is empty: add images or change data.split")
    counts = data.class_counts()
    absent = [c for c in data.classes if counts["train"].get(c, 0) == 0]
    if data.cfg.split.by == "identity":  # people kept out of training on purpose
        people = {s: sum(n > 0 for n in counts[s].values()) for s in SPLITS}
        log.info("split by person: %d in train, %d in val, %d in test (none in two splits)", people["train"],
                 people["val"], people["test"])
    elif absent:
        log.warning("class(es) %s have no training images: the model cannot learn them", absent)
    # (an empty val split is fit's error, where it matters: effft cv's held-out predictions leave
    # it empty on purpose)
    if not data.split_items("test"):
        log.warning("the test split is empty")
