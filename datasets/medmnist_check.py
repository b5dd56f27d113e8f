"""Check a MedMNIST .npz file and print its summary; optionally write it out as image folders.

A MedMNIST file (e.g. breastmnist.npz) is already what effft's medmnist adapter reads: this
script says whether a file has the expected arrays, their shapes, the label range and the class
counts per split, so a truncated download or a wrong file is found before training.

    python datasets/medmnist_check.py data/medmnist/breastmnist.npz
    python datasets/medmnist_check.py breastmnist.npz --to-folder data/breast_png   # PNG folders

--to-folder writes OUT/{train,val,test}/<label>/<index>.png, the folder adapter's ready split
(single-label files only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


def check(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (images, labels) of each split; raises SystemExit naming the problem."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {path} as a .npz file: {e}") from None
    out = {}
    with z:
        for split in SPLITS:
            ki, kl = f"{split}_images", f"{split}_labels"
            if ki not in z.files and kl not in z.files:
                continue
            if ki not in z.files or kl not in z.files:
                raise SystemExit(f"error: {path} has only one of {ki} / {kl}")
            images, labels = z[ki], z[kl]
            if labels.ndim == 1:
                labels = labels[:, None]
            if images.ndim not in (3, 4) or images.shape[0] != labels.shape[0]:
                raise SystemExit(f"error: {path}: {ki} {images.shape} and {kl} {labels.shape} "
                                 "do not match (expected N x H x W [x C] and N x labels)")
            out[split] = (images, labels)
    if "train" not in out:
        raise SystemExit(f"error: {path} has no train_images/train_labels; keys: {sorted(z.files)}")
    return out


def summary(path: Path, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    lines = [f"{path}: MedMNIST file, splits {', '.join(data)}"]
    for split, (images, labels) in data.items():
        kind = "multi-label" if labels.shape[1] > 1 else "single-label"
        lines.append(f"  {split}: {images.shape[0]} images of {'x'.join(map(str, images.shape[1:]))} "
                     f"{images.dtype}, {kind}")
        if labels.shape[1] > 1:
            positives = labels.sum(axis=0).tolist()
            lines.append(f"    positives per label: {positives}")
        else:
            values, counts = np.unique(labels[:, 0], return_counts=True)
            lines.append("    per class: " + ", ".join(f"{v}: {c}" for v, c in zip(values, counts)))
    return lines


def to_folder(data: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> int:
    written = 0
    for split, (images, labels) in data.items():
        if labels.shape[1] > 1:
            raise SystemExit("error: --to-folder needs a single-label file (class folders cannot "
                             "hold multi-label images)")
        for i, (image, label) in enumerate(zip(images, labels[:, 0])):
            folder = out / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="a MedMNIST .npz file, e.g. breastmnist.npz")
    parser.add_argument("--to-folder", type=Path, metavar="OUT",
                        help="also write OUT/{train,val,test}/<label>/<index>.png")
    args = parser.parse_args(argv)
    data = check(args.file)
    print("\n".join(summary(args.file, data)))
    if args.to_folder:
        n = to_folder(data, args.to_folder)
        print(f"wrote {n} PNG files to {args.to_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
