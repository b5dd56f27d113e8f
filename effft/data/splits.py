"""Train/val/test splits: by fractions and a seed, by group, or as the data set fixes them.

A pool of items without a split is cut in two steps: the test fraction is held out, then the
val fraction of what remains (or, for cross-validation, fold k of n of what remains is val).
  - Stratified by class so each split keeps the class proportions. Multi-label items are
    stratified by their rarest positive label (rarest in the pool), items without a label
    forming one stratum of their own: it keeps the rare findings, which matter most, in every
    split; a full label-combination stratification is impossible with few items per
    combination.
  - With a group key (patient, person) no group is in two splits. Groups are cut with
    scikit-learn's (Stratified)GroupKFold into round(1 / fraction) folds, one of which is held
    out, so a held-out fraction is 1/n of the groups' items (0.1 -> 10 folds, 0.15 -> 1/7).
  - By identity (`by: identity`, for embeddings): each person (class) is a group, so the people
    of val and test are never seen in training; fractions are then fractions of the people.
  - Where stratification cannot be done (a class with too few items or groups for the cut),
    the split falls back to an unstratified one and logs why.
Items with a ready split keep it; when they lack a val split, val is carved out of train.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.model_selection import (GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold,
                                     train_test_split)

from ..errors import EffftError
from ..paths import atomic_write
from .sources._common import SPLITS, Item

if TYPE_CHECKING:
    from ..config.schema import SplitConfig

log = logging.getLogger(__name__)

SPLITS_COLUMNS = ("path", "frame", "label", "group", "split")


def strata(items: list[Item]) -> np.ndarray:
    """The class each item is stratified by (multi-label: its rarest positive label, or -1)."""
    if not items or isinstance(items[0].target, int):
        return np.array([it.target for it in items], dtype=np.int64)
    counts = np.sum([it.target for it in items], axis=0)
    out = []
    for it in items:
        positive = [i for i, v in enumerate(it.target) if v]
        out.append(min(positive, key=lambda i: (counts[i], i)) if positive else -1)
    return np.array(out, dtype=np.int64)


def _groups(items: list[Item]) -> np.ndarray:
    # an item without a group is a group of its own
    return np.array([it.group if it.group is not None else f"\0item:{i}"
                     for i, it in enumerate(items)], dtype=object)


def _folds(items: list[Item], n: int, *, seed: int, stratify: bool, grouped: bool,
           what: str, exact: bool = False) -> list[np.ndarray]:
    """Cut `items` into `n` folds (fewer where there are fewer units, unless `exact`)."""
    y = strata(items)
    groups = _groups(items) if grouped else None
    units = len(set(groups)) if grouped else len(items)
    unit_name = "groups" if grouped else "items"
    if units < 2:
        raise EffftError(f"cannot cut {what}: it has {units} {unit_name[:-1]}; a split needs "
                         f"at least two {unit_name}")
    if exact and units < n:
        raise EffftError(f"cannot cut {what}: {n} folds need at least {n} {unit_name}, and "
                         f"there are {units}; use fewer folds")
    n = min(n, units)
    splitter = None
    if stratify:
        sizes = Counter(y.tolist()).values()
        if len(sizes) < 2:
            log.info("%s: one class only, split without stratification", what)
        elif (min(sizes) if not grouped else max(sizes)) < n:
            log.info("%s: not stratified, a class has too few items for %d parts", what, n)
        else:
            splitter = (StratifiedGroupKFold if grouped else StratifiedKFold)(
                n, shuffle=True, random_state=seed)
    fallback = (GroupKFold if grouped else KFold)(n, shuffle=True, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            folds = [test for _, test in (splitter or fallback).split(y, y, groups)]
        except ValueError as e:
            if splitter is None:
                raise
            log.info("%s: not stratified (%s)", what, e)
            folds = [test for _, test in fallback.split(y, y, groups)]
    for w in caught:  # e.g. "the least populated class has only 2 members"
        log.info("%s: %s", what, w.message)
    return folds


def _hold_out(items: list[Item], fraction: float, *, seed: int, stratify: bool, grouped: bool,
              what: str) -> tuple[list[int], list[int]]:
    """Indices (kept, held out) with about `fraction` of the items held out."""
    if grouped:
        n = max(2, round(1 / fraction))
        out = _folds(items, n, seed=seed, stratify=stratify, grouped=True, what=what)[0]
        held = set(out.tolist())
        return [i for i in range(len(items)) if i not in held], sorted(held)
    if len(items) < 2:
        raise EffftError(f"cannot cut {what}: it has {len(items)} item(s); a split needs two")
    index = np.arange(len(items))
    y = strata(items)
    if stratify and len(set(y.tolist())) > 1:
        try:
            kept, out = train_test_split(index, test_size=fraction, random_state=seed, stratify=y)
            return sorted(kept.tolist()), sorted(out.tolist())
        except ValueError as e:
            log.info("%s: not stratified (%s)", what, e)
    try:
        kept, out = train_test_split(index, test_size=fraction, random_state=seed)
    except ValueError as e:
        raise EffftError(f"cannot cut {what} from {len(items)} items at {fraction:.0%} ({e}); "
                         "add images or change data.split") from e
    return sorted(kept.tolist()), sorted(out.tolist())


def assign_splits(items: list[Item], config: SplitConfig, *, seed: int = 0) -> list[Item]:
    """The items with `split` set: kept where the data set fixes it, else cut by `config`.

    A data set with train and val but no test has its val reported as the test split and val
    cut from train (unless `config.own_val` is false); one with train alone is cut as a pool.
    """
    if not items:
        raise EffftError("the data set has no items to split")
    if config.by == "identity":
        return _by_identity(items, config, seed=seed)
    seed = config.seed if config.seed is not None else seed
    grouped = config.group and any(it.group is not None for it in items)
    given = {it.split for it in items}
    if given == {"train"}:  # train alone: nothing to report honestly on, so it is cut like a pool
        log.info("the data have a train split only: effft cuts val and test from it (data.split)")
        items, given = [replace(it, split=None) for it in items], {None}
    if None in given and len(given) > 1:
        raise EffftError("some items have a ready split and some do not; give all a split, "
                         "or none")
    opts = dict(seed=seed, stratify=config.stratify, grouped=grouped)
    if None in given:
        if config.test > 0:
            pool, test = _hold_out(items, config.test, what="the test split", **opts)
        else:
            pool, test = list(range(len(items))), []
        labels = {i: "test" for i in test}
        pool_items = [items[i] for i in pool]
    else:
        log.info("keeping the data set's own split (%s)",
                 ", ".join(s for s in SPLITS if s in given))
        labels = {i: it.split for i, it in enumerate(items)}
        if given == {"train", "val"} and config.folds is None:
            if config.own_val:
                # the data's val has picked nothing yet: it can give honest figures as the test
                # split, while effft's own validation, cut from train, picks what it must
                labels = {i: "test" if split == "val" else split for i, split in labels.items()}
                log.warning("the data have train and val but no test split: their val split (%d images) is "
                            "the test split, and effft validates on %.0f%% of train (data.split.own_val)",
                            sum(split == "test" for split in labels.values()),
                            100 * config.val / (config.train + config.val))
            else:
                log.warning("OPTIMISTIC FIGURES: the data's val split picks the checkpoint, threshold and "
                            "temperature and is also the split reported (data.split.own_val: false)")
                return list(items)
        pool = [i for i, split in labels.items() if split in ("train", "val")]
        pool_items = [items[i] for i in pool]
        if config.folds is None and "val" in {labels[i] for i in pool}:
            return list(items)
        if config.folds is None and given <= {"train", "test"}:
            log.info("no val split in the data: %.0f%% of train becomes val",
                     100 * config.val / (config.train + config.val))
    if config.folds is not None:
        folds = _folds(pool_items, config.folds, what="the cross-validation folds", exact=True,
                       **opts)
        val = set(folds[config.fold].tolist())
    else:
        fraction = config.val / (config.train + config.val)
        _, out = _hold_out(pool_items, fraction, what="the val split", **opts)
        val = set(out)
    for j, i in enumerate(pool):
        labels[i] = "val" if j in val else "train"
    return [replace(it, split=labels[i]) for i, it in enumerate(items)]


def _by_identity(items: list[Item], config: SplitConfig, *, seed: int) -> list[Item]:
    """Every image of a person (class) in one split: people are the groups, nothing stratified."""
    if not all(isinstance(it.target, int) for it in items):
        raise EffftError("data.split.by: identity needs one person (class) per image, not multi-label data")
    if any(it.split is not None for it in items):
        people: dict[int, set[str]] = {}
        for it in items:
            people.setdefault(int(it.target), set()).add(str(it.split))  # type: ignore[arg-type]
        shared = sorted(t for t, splits in people.items() if len(splits) > 1)
        if shared:
            raise EffftError(f"data.split.by: identity, but the data's own split folders hold {len(shared)} "
                             "person(s) in more than one split: put each person's photos in one split folder, "
                             "or remove the split folders and let effft split by person")
        return list(items)
    people_config = config.model_copy(update={"by": "item", "group": True, "stratify": False})
    keyed = [replace(it, group=f"person {it.target}") for it in items]
    split = assign_splits(keyed, people_config, seed=seed)
    return [replace(it, split=s.split) for it, s in zip(items, split)]


def split_people(items: list[Item]) -> dict[str, set[int]]:
    """{split: the people (classes) with an image in it}."""
    out: dict[str, set[int]] = {}
    for it in items:
        out.setdefault(str(it.split), set()).add(int(it.target))  # type: ignore[arg-type]
    return out


UNUSED = "unused"  # in the data set, left out of this run on purpose (a cross-validation fold's held-out part)


def label_text(target: int | tuple[int, ...], classes: list[str]) -> str:
    """A target as class name(s): "cat", or "Effusion|Mass" for multi-label ("" for none)."""
    if isinstance(target, int):
        return classes[target]
    return "|".join(c for c, v in zip(classes, target) if v)


def write_splits(path: Path, items: list[Item], classes: list[str]) -> None:
    """`splits.csv`: path, frame, label, group, split of every item."""
    with atomic_write(Path(path)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(SPLITS_COLUMNS)
        for it in items:
            w.writerow([it.path, "" if it.frame is None else it.frame,
                        label_text(it.target, classes), it.group or "", it.split])


def _key(path: str, frame: int | None) -> tuple[str, int | None]:
    return os.path.abspath(path), frame


def read_splits(path: Path) -> dict[tuple[str, int | None], str]:
    """A `splits.csv` as {(absolute path, frame): split}."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise EffftError(f"cannot read the split file {path}: {e}") from e
    if rows and not {"path", "split"} <= set(rows[0]):
        raise EffftError(f"{path} is not a split file: it needs columns path and split")
    out = {}
    for line, row in enumerate(rows, start=2):
        if row["split"] not in (*SPLITS, UNUSED):
            raise EffftError(f"{path} line {line}: split {row['split']!r} is not one of {(*SPLITS, UNUSED)}")
        frame = int(row["frame"]) if row.get("frame") else None
        out[_key(row["path"], frame)] = row["split"]
    return out


def apply_splits(items: list[Item], table: dict[tuple[str, int | None], str], *,
                 source: Path | str = "the split file") -> list[Item]:
    """The items with the splits of `table` (from `read_splits`).

    Files listed there but gone, and files new since, are reported; new files are left out so
    that the split stays as it was.
    """
    known, new = [], []
    for it in items:
        split = table.get(_key(it.path, it.frame))
        (known if split is not None else new).append(replace(it, split=split) if split else it)
    missing = set(table) - {_key(it.path, it.frame) for it in items}
    if missing:
        shown = ", ".join(sorted(p for p, _ in missing)[:5])
        log.warning("%d file(s) in %s are no longer in the data set (e.g. %s); the split "
                    "goes on without them", len(missing), source, shown)
    if new:
        log.warning("%d file(s) are new since %s was written (e.g. %s); they are left out to "
                    "keep the split as it was", len(new), source, new[0].path)
    if not known:
        raise EffftError(f"none of the files in {source} is in the data set: is data.root the "
                         "one the split was made for? (remove the split file to make a new one)")
    return known
