"""Turn an ISIC skin-lesion ground-truth CSV into a CSV that effft's csv adapter reads.

ISIC 2019 (ISIC_2019_Training_GroundTruth.csv): column `image` and one 1.0/0.0 column per
diagnosis (MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK). ISIC 2020
(ISIC_2020_Training_GroundTruth.csv): `image_name`, `patient_id`, `benign_malignant`, `target`.
The output has columns `image` (path relative to the output CSV), `label` (the diagnosis, or
benign / malignant for 2020), `group` (the patient, where the table or --metadata has one)
and, for 2019, the 0/1 columns again as integers. Rows whose image file is missing, and 2019
rows with no or several diagnoses, are counted and left out. Diagnosis columns with no
positive row (UNK in the training set) are dropped.

    python datasets/isic.py ISIC_2019_Training_GroundTruth.csv --images ISIC_2019_Training_Input \
        --out data/isic2019/labels.csv [--metadata ISIC_2019_Training_Metadata.csv]

Then a recipe's data section: {adapter: csv, root: data/isic2019, csv: {file: labels.csv,
label_column: label, group_column: group}}.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

SUFFIXES = (".jpg", ".jpeg", ".png")


def _find(images: Path, name: str) -> Path | None:
    for suffix in ("", *SUFFIXES):
        p = images / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _flag(value: str) -> int | None:
    try:
        v = float(value)
    except ValueError:
        return None
    return int(v) if v in (0.0, 1.0) else None


def _groups(metadata: Path | None) -> dict[str, str]:
    if metadata is None:
        return {}
    with open(metadata, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    key = next((k for k in ("patient_id", "lesion_id") if rows and k in rows[0]), None)
    if key is None:
        raise SystemExit(f"error: {metadata} has no patient_id or lesion_id column")
    return {r["image"]: r[key] for r in rows if r.get(key)}


def convert(table: Path, images: Path, out: Path, metadata: Path | None) -> tuple[int, int, dict[str, int]]:
    """Write `out`; returns (rows written, rows left out, count per label)."""
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    groups = _groups(metadata)
    if "image_name" in columns and "benign_malignant" in columns:  # ISIC 2020
        image_col, label_cols = "image_name", []
    elif "image" in columns:  # ISIC 2019: one-hot columns
        image_col = "image"
        label_cols = [c for c in columns if c != image_col and rows and all(_flag(r[c]) is not None for r in rows)]
        label_cols = [c for c in label_cols if any(_flag(r[c]) == 1 for r in rows)]
        if len(label_cols) < 2:
            raise SystemExit(f"error: {table} has fewer than two 0/1 diagnosis columns ({columns})")
    else:
        raise SystemExit(f"error: {table} is neither an ISIC 2019 nor 2020 ground truth "
                         f"(columns: {columns})")
    out.parent.mkdir(parents=True, exist_ok=True)
    written, left_out, counts = 0, 0, {}
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "group", *label_cols])
        for r in rows:
            path = _find(images, r[image_col])
            if label_cols:
                positive = [c for c in label_cols if _flag(r[c]) == 1]
                label = positive[0] if len(positive) == 1 else None
            else:
                label = r["benign_malignant"].strip() or None
            if path is None or label is None:
                left_out += 1
                continue
            group = r.get("patient_id") or groups.get(r[image_col], "")
            rel = os.path.relpath(path, out.parent)
            writer.writerow([Path(rel).as_posix(), label, group, *(_flag(r[c]) for c in label_cols)])
            written += 1
            counts[label] = counts.get(label, 0) + 1
    return written, left_out, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="the ISIC ground-truth CSV")
    parser.add_argument("--images", type=Path, required=True, help="the folder of the ISIC images")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write, e.g. data/isic2019/labels.csv")
    parser.add_argument("--metadata", type=Path, default=None,
                        help="ISIC 2019 metadata CSV: its lesion_id (or patient_id) becomes the group")
    args = parser.parse_args(argv)
    if not args.table.is_file():
        raise SystemExit(f"error: {args.table} not found")
    if not args.images.is_dir():
        raise SystemExit(f"error: image folder {args.images} not found")
    written, left_out, counts = convert(args.table, args.images, args.out, args.metadata)
    if not written:
        raise SystemExit(f"error: no row of {args.table} has an image in {args.images}")
    print(f"wrote {args.out}: {written} images, {left_out} rows left out (image missing or no single label)")
    print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
