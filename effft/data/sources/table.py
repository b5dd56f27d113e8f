"""The `csv` adapter: a CSV or TSV file naming one image per row and its label(s).

Labels come in one of three shapes:
  - one column with a class name per row (`label_column`): multi-class, or binary with two;
  - several 0/1 columns, one per class (`label_columns`): multi-label;
  - one column of names joined by a separator, e.g. `Effusion|Mass` (`label_separator`):
    multi-label; an empty cell, or the `negative_label` (e.g. "No Finding"), means no label.

Image paths are relative to the folder the CSV is in (or to `image_dir`), or absolute. A row
whose file does not exist is reported as a bad file (path and line), and the rest of the data
set still loads; `data.on_bad_file` then decides. A label outside `classes` (when given) is an
error naming the line and the value. Lines are counted as an editor shows them (the header is
line 1).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from ...errors import EffftError
from ._common import BadFile, FileSource, Item, Source, cell, column, read_table, split_name, task_of

_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no", ""}


class Options(BaseModel):
    """Keys of `data.csv`."""

    model_config = ConfigDict(extra="forbid")

    file: Path | None = None
    """The CSV/TSV, relative to data.root; omit when data.root is the file itself."""
    image_dir: Path | None = None
    """Folder that relative image paths start from (default: the CSV's folder)."""
    image_column: str = "image"
    label_column: str | None = None
    """One class name per row (default "label" when no other label key is given)."""
    label_columns: list[str] | None = None
    """Several 0/1 columns, one per class: multi-label."""
    label_separator: str | None = None
    """Split `label_column` on this (e.g. "|") into several labels: multi-label."""
    negative_label: str | None = None
    """With label_separator: the value meaning "no label" (e.g. "No Finding")."""
    classes: list[str] | None = None
    """Class names and their order; a row with another label is an error."""
    split_column: str | None = None
    group_column: str | None = None
    delimiter: str | None = None
    """Column separator (default: sniffed from the file, tab for .tsv)."""

    @model_validator(mode="after")
    def _one_label_shape(self) -> Options:
        if self.label_columns is not None:
            if self.label_column is not None or self.label_separator is not None:
                raise ValueError("give either label_columns (one 0/1 column per class) or "
                                 "label_column (with label_separator for multi-label), not both")
            if len(self.label_columns) < 2:
                raise ValueError("label_columns needs two or more columns (one per class)")
            if self.classes is not None:
                raise ValueError("with label_columns the class names are the column names: "
                                 "remove classes")
        elif self.label_column is None:
            self.label_column = "label"
        if self.negative_label is not None and self.label_separator is None:
            raise ValueError("negative_label only applies with label_separator")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes has duplicates: {self.classes}")
        return self


def _csv_path(root: Path, options: Options) -> Path:
    path = root / options.file if options.file is not None else root
    if not path.exists():
        raise EffftError(f"CSV file {path} does not exist: check data.root and data.csv.file")
    if path.is_dir():
        found = sorted(path.glob("*.csv")) + sorted(path.glob("*.tsv"))
        hint = f" (found: {', '.join(p.name for p in found)})" if found else ""
        raise EffftError(f"data.root {path} is a folder: name the table in it with "
                         f"data.csv.file{hint}")
    return path


def load(root: Path, options: Options, *, channels: int) -> Source:
    """Items from the rows of a CSV/TSV file."""
    path = _csv_path(Path(root).expanduser(), options)
    header, rows = read_table(path, delimiter=options.delimiter)
    image_dir = path.parent if options.image_dir is None else Path(root) / options.image_dir
    col = {key: column(header, name, key=f"data.csv.{key}", path=path) for key, name in (
        ("image_column", options.image_column), ("label_column", options.label_column),
        ("split_column", options.split_column), ("group_column", options.group_column),
    ) if name is not None}
    label_cols = [column(header, n, key="data.csv.label_columns", path=path) for n in options.label_columns or []]

    def at(row: list[str], line: int, index: int) -> str:
        return cell(row, index, line=line, header=header, path=path, key="data.csv.delimiter")

    parsed, bad = [], []
    first_line: dict[Path, int] = {}
    for line, row in rows:
        name = at(row, line, col["image_column"])
        if not name:
            raise EffftError(f"{path} line {line}: the image column {options.image_column!r} is "
                             "empty")
        image = Path(name).expanduser()
        image = image if image.is_absolute() else image_dir / image
        if image in first_line:  # twice: it could land in train and test at once
            raise EffftError(f"{path} lines {first_line[image]} and {line} both list {name}: list each image "
                             "once (several labels of one image go in one row: data.csv.label_separator "
                             "or data.csv.label_columns)")
        first_line[image] = line
        if not image.is_file():
            bad.append(BadFile(path=str(image), reason=f"{path.name} line {line}: file not found"))
            continue
        if options.label_columns is not None:
            label = tuple(_flag(at(row, line, i), header[i], line, path) for i in label_cols)
        else:
            label = at(row, line, col["label_column"])
        split = split_name(at(row, line, col["split_column"]), line=line, path=path) \
            if "split_column" in col else None
        group = (at(row, line, col["group_column"]) or None) if "group_column" in col else None
        parsed.append((line, str(image), label, group, split))

    if options.label_columns is not None:
        classes = list(options.label_columns)
        items = [Item(path=p, target=lab, group=g, split=s) for _, p, lab, g, s in parsed]
        task = "multilabel"
    elif options.label_separator is not None:
        classes, items = _multilabel_items(parsed, options, path)
        task = "multilabel"
    else:
        classes, items = _single_label_items(parsed, options, path)
        task = task_of(classes)
    if len(classes) < 2:
        raise EffftError(f"{path} has one class ({classes}); a classifier needs at least two")
    splits = {it.split for it in items}
    if None in splits and len(splits) > 1:
        raise EffftError(f"{path}: some rows have an empty {options.split_column!r}; give every "
                         "row a split (train, val or test) or none")
    return FileSource(items=items, classes=classes, task=task, bad=bad)


def _flag(value: str, column: str, line: int, path: Path) -> int:
    v = value.lower()
    if v in _TRUE:
        return 1
    if v in _FALSE:
        return 0
    raise EffftError(f"{path} line {line}, column {column!r}: {value!r} is not 0 or 1 (each "
                     "label column holds 1 where the image has that label, else 0)")


def _sorted_names(names: set[str]) -> list[str]:
    """Class names in order: numerically when all are integers (2 before 10), else by text."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _check_known(value: str, classes: list[str], line: int, path: Path) -> None:
    if value not in classes:
        close = difflib.get_close_matches(value, classes, n=3)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise EffftError(f"{path} line {line}: label {value!r} is not one of data.csv.classes "
                         f"{classes}{hint}; add it to classes or fix the row")


def _single_label_items(parsed: list, options: Options, path: Path) -> tuple[list[str], list[Item]]:
    for line, _, label, _, _ in parsed:
        if not label:
            raise EffftError(f"{path} line {line}: the label column {options.label_column!r} is "
                             "empty; give every row a label")
    classes = options.classes or _sorted_names({lab for _, _, lab, _, _ in parsed})
    items = []
    for line, p, label, g, s in parsed:
        _check_known(label, classes, line, path)
        items.append(Item(path=p, target=classes.index(label), group=g, split=s))
    return classes, items


def _multilabel_items(parsed: list, options: Options, path: Path) -> tuple[list[str], list[Item]]:
    def names(label: str) -> list[str]:
        parts = [x.strip() for x in label.split(options.label_separator)]
        return [x for x in parts if x and x != options.negative_label]

    classes = options.classes or _sorted_names(
        {n for _, _, lab, _, _ in parsed for n in names(lab)})
    items = []
    for line, p, label, g, s in parsed:
        present = names(label)
        for n in present:
            _check_known(n, classes, line, path)
        target = tuple(int(c in present) for c in classes)
        items.append(Item(path=p, target=target, group=g, split=s))
    return classes, items
