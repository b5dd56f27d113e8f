"""Check a folder of class folders before training: non-images, unreadable images, class counts.

    python datasets/check_folder.py data/my_images
    python datasets/check_folder.py data/my_images --split-to data/my_images_split --val 0.1 --test 0.1

Reads ROOT/<class>/**/<file> (or ROOT/{train,val,test}/<class>/...). Every image is decoded
with effft's scanner, so truncated and corrupt files are listed by path with the reason; files
effft does not read as images (.txt, .heic, ...) are listed too. With --split-to the readable
images are copied to OUT/{train,val,test}/<class>/, split per class at random (seed --seed),
the folder adapter's ready-split layout. The exit status is 1 when unreadable images were found.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

from effft.data.decode import is_image_file
from effft.data.scan import scan

SPLIT_NAMES = {"train", "val", "test"}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _classes(root: Path) -> dict[str, Path]:
    return {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def split_counts(n: int, val: float, test: float) -> tuple[int, int, int]:
    """(train, val, test) sizes of a class of n images; train keeps at least one."""
    n_test = min(round(n * test), max(n - 1, 0))
    n_val = min(round(n * val), max(n - 1 - n_test, 0))
    return n - n_val - n_test, n_val, n_test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder holding one sub-folder per class")
    parser.add_argument("--split-to", type=Path, metavar="OUT", help="copy readable images to OUT/{train,val,test}/<class>/")
    parser.add_argument("--val", type=float, default=0.1, help="fraction of each class for val (default: %(default)s)")
    parser.add_argument("--test", type=float, default=0.1, help="fraction of each class for test (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        raise SystemExit(f"error: {args.root} is not a folder")
    if not 0 <= args.val < 1 or not 0 <= args.test < 1 or args.val + args.test >= 1:
        raise SystemExit("error: --val and --test are fractions with val + test < 1")
    top = _classes(args.root)
    ready = bool(top) and set(top) <= SPLIT_NAMES
    groups = {f"{s}/{c}": d for s, sd in top.items() for c, d in _classes(sd).items()} if ready else top
    if len(groups) < (2 * len(top) if ready else 2):
        raise SystemExit(f"error: {args.root} needs at least two class folders (ROOT/<class>/images)")
    if ready and args.split_to:
        raise SystemExit(f"error: {args.root} is already split into {sorted(top)}; --split-to needs class folders")

    images: dict[str, list[Path]] = {}
    others: list[Path] = []
    for name, folder in groups.items():
        files = _files(folder)
        images[name] = [p for p in files if is_image_file(p)]
        others += [p for p in files if not is_image_file(p)]
    bad = scan([str(p) for ps in images.values() for p in ps])
    bad_paths = {b.path for b in bad}

    print(f"{args.root}: {len(groups)} {'split/class' if ready else 'class'} folders")
    for name, ps in images.items():
        n_bad = sum(str(p) in bad_paths for p in ps)
        print(f"  {name}: {len(ps) - n_bad} images" + (f" ({n_bad} unreadable)" if n_bad else ""))
    if others:
        print(f"{len(others)} file(s) that are not images effft reads (left out):")
        for p in others[:50]:
            print(f"  {p}")
    if bad:
        print(f"{len(bad)} unreadable image(s):")
        for b in bad:
            print(f"  {b.path}: {b.reason}")
    empty = [n for n, ps in images.items() if len(ps) == sum(str(p) in bad_paths for p in ps)]
    if empty:
        print(f"class folder(s) without a readable image: {', '.join(empty)} (effft will refuse them)")

    if args.split_to:
        rng = random.Random(args.seed)
        for name, ps in images.items():
            good = [p for p in ps if str(p) not in bad_paths]
            rng.shuffle(good)
            n_train, n_val, _ = split_counts(len(good), args.val, args.test)
            parts = {"train": good[:n_train], "val": good[n_train:n_train + n_val], "test": good[n_train + n_val:]}
            for split, chosen in parts.items():
                for p in chosen:
                    dest = args.split_to / split / name / p.relative_to(groups[name])
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, dest)
        print(f"copied the readable images to {args.split_to}/{{train,val,test}}/<class>/")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
