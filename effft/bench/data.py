"""`effft bench data`: the train pipeline from files against the decoded-image cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.table import Table

from ..console import console
from ..errors import EffftError


def _large_images(folder: Path, count: int, side: int = 2000) -> Path:
    """`count` JPEGs about the size of chest X-rays, in two class folders (smooth grey noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        cls = folder / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (side // 16, side // 16), dtype=np.uint8)
        Image.fromarray(small).resize((side, side - side // 10), Image.BICUBIC).save(cls / f"{i}.jpg", quality=90)
    return folder


def pipeline_throughput(root: Path, *, image_size: int, cache: str, cache_dir: Path, limit: int,
                        lean: bool = False) -> tuple[float, float]:
    """(seconds to set up, incl. building the cache; train images/s through decode + augment),
    in one process. The per-image path (`lean` false: an explicit train list, as a loader worker
    runs it) is per worker; the lean path makes whole batches in the training process."""
    from ..config.schema import DataConfig
    from ..data.datamodule import EffftDataModule
    from ..data.dataset import load_data
    from ..data.transforms import TRAIN_SCALE
    from ..input import InputSpec

    per_image = [{"RandomResizedCrop": {"size": [image_size, image_size], "scale": list(TRAIN_SCALE)}},
                 {"HorizontalFlip": {"p": 0.5}}]
    cfg = DataConfig.model_validate({"adapter": "folder", "root": str(root), "num_workers": 0, "cache": cache,
                                     "cache_dir": str(cache_dir), "split": {"train": 0.8, "val": 0.1, "test": 0.1},
                                     "augment": {"train": "default" if lean else per_image}})
    data = load_data(cfg, channels=3, seed=0, progress=False)
    dm = EffftDataModule(data, InputSpec(size=image_size), progress=False)
    start = time.perf_counter()
    dm.setup()
    setup = time.perf_counter() - start
    n = min(limit, len(data.split_items("train")))
    if lean:
        loader = dm.train_dataloader()
        next(iter(loader))  # warm-up
        start, seen = time.perf_counter(), 0
        for x, _, _ in loader:
            seen += len(x)
            if seen >= n:
                break
        return setup, seen / (time.perf_counter() - start)
    ds = dm.dataset("train")
    ds[(0, 0)]  # warm-up
    start = time.perf_counter()
    for i in range(n):
        ds[(i, i)]
    return setup, n / (time.perf_counter() - start)


def run_data_bench(args: argparse.Namespace) -> int:
    import tempfile

    torch.set_num_threads(1)  # a loader worker is one process on one core
    with tempfile.TemporaryDirectory() as tmp:
        sets = {}
        if args.root:
            if not Path(args.root).is_dir():
                raise EffftError(f"--root {args.root} is not a folder of class folders")
            sets[f"{args.root}"] = Path(args.root)
        sets[f"{args.large} generated 2000 px JPEGs"] = _large_images(Path(tmp) / "large", args.large)
        table = Table(title=f"train pipeline, {args.image_size} px, one process, one thread")
        for col in ("data", "path", "img/s", "ratio to files", "setup s"):
            table.add_column(col, justify="right")
        for label, root in sets.items():
            common = dict(image_size=args.image_size, cache_dir=Path(tmp) / "c", limit=args.limit)
            paths = {"from files, per image": dict(cache="off"), "from cache, per image": dict(cache="disk"),
                     "lean, whole batches": dict(cache="ram", lean=True)}
            files = None
            for path, how in paths.items():
                setup, speed = pipeline_throughput(root, **how, **common)
                files = files or speed
                table.add_row(label, path, f"{speed:.1f}", f"{speed / files:.2f}", f"{setup:.1f}")
        console.print(table)
    return 0
