"""Make identity folders for recipes/face_b0.yaml from LFW (lfw-deepfunneled/<person>/*.jpg).

Most of LFW's 5,749 people have one photo; identification needs several per person. This
script copies (or links, with --link) the photos of the people with at least --min-images
photos, at most --max-images each, into OUT/<person>/.

    python datasets/lfw.py data/lfw-deepfunneled data/faces --min-images 20 [--max-images 50] [--link]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

SUFFIXES = {".jpg", ".jpeg", ".png"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the unpacked lfw-deepfunneled (or lfw) folder")
    parser.add_argument("out", type=Path, help="where to write <person>/ folders")
    parser.add_argument("--min-images", type=int, default=20, help="people with fewer photos are left out (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=None, help="at most this many photos per person")
    parser.add_argument("--link", action="store_true", help="symbolic links instead of copies")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        raise SystemExit(f"error: {args.source} is not a folder: unpack lfw-deepfunneled.tgz and give its folder")
    if args.min_images < 1:
        raise SystemExit("error: --min-images must be 1 or more")
    people = {}
    for d in sorted(p for p in args.source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = sorted(p for p in d.iterdir() if p.suffix.lower() in SUFFIXES)
        if len(photos) >= args.min_images:
            people[d.name] = photos[:args.max_images]
    if len(people) < 2:
        raise SystemExit(f"error: {len(people)} person(s) under {args.source} have {args.min_images} "
                         "photos or more; a classifier needs two: lower --min-images")
    for name, photos in people.items():
        target = args.out / name
        target.mkdir(parents=True, exist_ok=True)
        for p in photos:
            dest = target / p.name
            if dest.exists() or dest.is_symlink():
                dest.unlink()
            if args.link:
                os.symlink(p.resolve(), dest)
            else:
                shutil.copyfile(p, dest)
    total = sum(len(v) for v in people.values())
    print(f"wrote {total} photos of {len(people)} people (at least {args.min_images} each) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
