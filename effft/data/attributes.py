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


def _dicom_tags(path: str, names: list[str]) -> dict[str, str]:
    """The header tags `names` of one DICOM file (UNKNOWN where the file or the tag lacks them)."""
    from .decode import BadImageError, read_dicom_header

    try:
        header = read_dicom_header(path)
    except (BadImageError, OSError):
        return dict.fromkeys(names, UNKNOWN)
    out = {}
    for name in names:
        value = str(header.get(DICOM_TAGS[name], "") or "").strip()
        out[name] = (age_band(value) if name == "age_band" else value) if value else UNKNOWN
    return out


def _table_columns(cfg: DataConfig, items: list[Item], names: list[str]) -> dict[str, list[str]]:
    """The values of those of `names` that are columns of the adapter's table, per item."""
    table = _table(cfg)
    if table is None or not table[0].is_file():
        return {}
    header, rows = read_table(table[0], delimiter=table[1])
    found = [n for n in names if n in header]
    if not found:
        return {}
    image, base = header.index(_image_column(cfg)), _image_base(cfg, table[0])
    by_path: dict[str, list[str]] = {}
    for _, cells in rows:
        if image < len(cells):
            p = Path(cells[image]).expanduser()
            by_path[os.path.normpath(p if p.is_absolute() else base / p)] = cells
    rows_of = [by_path.get(os.path.normpath(it.path)) or [] for it in items]  # [] where the table lacks it

    def column_values(at: int) -> list[str]:
        return [(cells[at].strip() if at < len(cells) else "") or UNKNOWN for cells in rows_of]

    return {name: column_values(header.index(name)) for name in found}


def values(cfg: DataConfig, items: list[Item], names: list[str]) -> dict[str, list[str]]:
    """{name: the value of attribute `name` for each item} (UNKNOWN where a row or a header lacks
    it): the adapter's table read once, each DICOM header once."""
    out = _table_columns(cfg, items, names)
    tags = [n for n in names if n not in out and cfg.adapter == "dicom" and n in DICOM_TAGS]
    if tags:
        read = [_dicom_tags(it.path, tags) for it in items]
        out.update({name: [r[name] for r in read] for name in tags})
    missing = [n for n in names if n not in out]
    if missing:
        raise RecipeError(f"report.subgroups: {missing[0]!r} is not a column of the data at {cfg.root}")
    return {name: out[name] for name in names}
