"""Make the CSV of recipes/chest_multilabel_b0.yaml from NIH ChestX-ray14's Data_Entry_2017.csv.

The download unpacks into images_001/images/*.png ... images_012/images/*.png (or one images/
folder). This script finds every PNG under ROOT, keeps the rows of Data_Entry_2017.csv whose
image is there (rows without an image are counted and left out), writes `Image Index` as a
path relative to ROOT, and keeps `Finding Labels` and `Patient ID`. With --patients N it keeps
the images of N patients chosen at random (a patient-level subset, so no patient is cut in two).

    python datasets/chestxray14.py data/chestxray14 [--patients 3000] [--out chest14.csv]
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

COLUMNS = ("Image Index", "Finding Labels", "Patient ID")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder holding Data_Entry_2017.csv and the images")
    parser.add_argument("--entries", type=Path, default=None,
                        help="the NIH table (default: ROOT/Data_Entry_2017.csv)")
    parser.add_argument("--out", default="chest14.csv", help="CSV written in ROOT (default: %(default)s)")
    parser.add_argument("--patients", type=int, default=None, help="keep N patients chosen at random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient subset (default: 0)")
    args = parser.parse_args(argv)

    entries = args.entries or args.root / "Data_Entry_2017.csv"
    if not entries.is_file():
        raise SystemExit(f"error: {entries} not found: download Data_Entry_2017.csv from the NIH "
                         "ChestX-ray14 page into ROOT, or name it with --entries")
    found = {p.name: p.relative_to(args.root).as_posix() for p in args.root.rglob("*.png")}
    with open(entries, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing_cols = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing_cols:
            raise SystemExit(f"error: {entries} lacks column(s) {missing_cols}; is it Data_Entry_2017.csv?")
        rows = list(reader)
    kept = [r for r in rows if r["Image Index"] in found]
    if not kept:
        raise SystemExit(f"error: none of the {len(rows)} images listed in {entries} is under {args.root}")
    if args.patients is not None:
        patients = sorted({r["Patient ID"] for r in kept})
        chosen = set(random.Random(args.seed).sample(patients, min(args.patients, len(patients))))
        kept = [r for r in kept if r["Patient ID"] in chosen]
    out = args.root / args.out
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in kept:
            writer.writerow([found[r["Image Index"]], r["Finding Labels"], r["Patient ID"]])
    findings: dict[str, int] = {}
    for r in kept:
        for name in r["Finding Labels"].split("|"):
            findings[name] = findings.get(name, 0) + 1
    print(f"wrote {out}: {len(kept)} images of {len({r['Patient ID'] for r in kept})} patients "
          f"({len(rows) - len([r for r in rows if r['Image Index'] in found])} listed images not found)")
    print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(findings.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
