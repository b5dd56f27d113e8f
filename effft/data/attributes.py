"""What `report.subgroups` can break figures down by: the columns of the CSV adapter's table, and
for DICOM data a few header tags (and the columns of its CSV, where it has one).

Attributes are looked up when the report is made, from the same files the adapter read: a
column's value for each image, a tag read from each file's header. A name that is neither is a
recipe error listing the names there are, raised before a run writes anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RecipeError
from .sources._common import Item, read_table

if TYPE_CHECKING:
    from ..config.schema import DataConfig

# DICOM header tags a subgroup can be, by the name a recipe gives; age_band is made from PatientAge
DICOM_TAGS = {"PatientSex": "PatientSex", "age_band": "PatientAge", "PatientAge": "PatientAge",
              "Manufacturer": "Manufacturer", "InstitutionName": "InstitutionName",
              "ManufacturerModelName": "ManufacturerModelName"}
AGE_BANDS = ((18, "0-17"), (40, "18-39"), (60, "40-59"), (80, "60-79"))
UNKNOWN = "(unknown)"


def _table(cfg: DataConfig) -> tuple[Path, str | None] | None:
    """The CSV the adapter read, and its delimiter; None where it reads none."""
    root = Path(cfg.root).expanduser()
    options = cfg.options
    if cfg.adapter == "csv":
        return (root / options.file if options.file is not None else root), options.delimiter
    if cfg.adapter == "dicom" and getattr(options, "csv", None):
        table = Path(options.csv).expanduser()
        return (table if table.is_absolute() else root / table), ","
    return None


def _image_base(cfg: DataConfig, table: Path) -> Path:
    """The folder relative image paths of the table start from, as the adapter reads them."""
    root = Path(cfg.root).expanduser()
    if cfg.adapter == "csv":
        return table.parent if cfg.options.image_dir is None else root / cfg.options.image_dir
    return root


def _image_column(cfg: DataConfig) -> str:
    return cfg.options.image_column if cfg.adapter == "csv" else cfg.options.path_column


def available(cfg: DataConfig) -> list[str]:
    """The names `report.subgroups` may give for this data."""
    names: list[str] = []
    table = _table(cfg)
    if table is not None and table[0].is_file():
        header, _ = read_table(table[0], delimiter=table[1])
        names += header
    if cfg.adapter == "dicom":
        names += [n for n in DICOM_TAGS if n not in names]
    return names


def check_subgroups(cfg: DataConfig, wanted: list[str]) -> None:
    """A recipe error for a subgroup name the data do not have."""
    if not wanted:
        return
    names = available(cfg)
    unknown = [w for w in wanted if w not in names]
    if not names:
        raise RecipeError(f"report.subgroups {wanted}: the {cfg.adapter} adapter gives no columns to break "
                          "the figures down by; subgroups come from the csv adapter's columns or DICOM headers: "
                          "remove report.subgroups")
    if unknown:
        raise RecipeError(f"report.subgroups: {', '.join(repr(u) for u in unknown)} is not a column of the data "
                          f"at {cfg.root}; the names there are: {', '.join(names)}")


def age_band(age: str) -> str:
    """A DICOM age string ("045Y", "006M", "010D", "002W") as a band of years."""
    age = age.strip().upper()
    if len(age) < 2 or not age[:-1].isdigit():
        return UNKNOWN
    years = int(age[:-1]) if age[-1] == "Y" else 0
    for upper, name in AGE_BANDS:
        if years < upper:
            return name
    return "80+"


def _dicom_tag(path: str, name: str) -> str:
    from .decode import BadImageError, read_dicom_header

    try:
        value = str(read_dicom_header(path).get(DICOM_TAGS[name], "") or "").strip()
    except (BadImageError, OSError):
        return UNKNOWN
    if name == "age_band":
        return age_band(value) if value else UNKNOWN
    return value or UNKNOWN


def values(cfg: DataConfig, items: list[Item], name: str) -> list[str]:
    """The value of attribute `name` for each item (UNKNOWN where a row or header lacks it)."""
    table = _table(cfg)
    if table is not None and table[0].is_file():
        header, rows = read_table(table[0], delimiter=table[1])
        if name in header:
            image, at = header.index(_image_column(cfg)), header.index(name)
            base = _image_base(cfg, table[0])
            by_path = {}
            for _, cells in rows:
                if image < len(cells):
                    p = Path(cells[image]).expanduser()
                    by_path[os.path.normpath(p if p.is_absolute() else base / p)] = \
                        (cells[at].strip() if at < len(cells) else "") or UNKNOWN
            return [by_path.get(os.path.normpath(it.path), UNKNOWN) for it in items]
    if cfg.adapter == "dicom" and name in DICOM_TAGS:
        return [_dicom_tag(it.path, name) for it in items]
    raise RecipeError(f"report.subgroups: {name!r} is not a column of the data at {cfg.root}")
