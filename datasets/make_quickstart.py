"""Build the quickstart data set: scikit-learn's handwritten digits as an image folder.

The 1,797 8x8 digit images ship inside scikit-learn (UCI ML hand-written digits, Alpaydin &
Kaynak, 1998), so this works offline. Each is upscaled to 64x64 PNG and written to
`<out>/<digit>/<index>.png`, the layout of effft's folder adapter.

    python datasets/make_quickstart.py [--out datasets/quickstart_digits] [--per-class N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "quickstart_digits")
    parser.add_argument("--per-class", type=int, default=None, help="at most this many images per digit")
    parser.add_argument("--size", type=int, default=64, help="side of the written images in pixels")
    args = parser.parse_args()

    digits = load_digits()
    done = args.out / ".complete"
    if done.exists():
        print(f"{args.out} is ready")
        return
    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        if args.per_class is not None and counts.get(label, 0) >= args.per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels = (image / 16.0 * 255).clip(0, 255).astype(np.uint8)  # values are 0..16
        folder = args.out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((args.size, args.size), Image.BICUBIC).convert("RGB").save(folder / f"{index:04d}.png")
    done.write_text("")
    print(f"wrote {sum(counts.values())} images in {len(counts)} class folders to {args.out}")


if __name__ == "__main__":
    main()
