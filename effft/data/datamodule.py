"""From a recipe's `data:` section to batches: the LightningDataModule of effft.

Order of work: `prepare_source()` loads the adapter, scans the files, drops (or refuses) the
bad ones and splits; the model can then be built from `num_classes`. `setup()` builds the
datasets (and the image cache). Batches are `(images, targets, indices)`: images float32
[B, C, H, W] normalised, targets int64 [B] (binary, multi-class) or float32 [B, L]
(multi-label), and each item's position in `split_items(split)`, so reports can name files.

Training draws from an `EpochSampler`: order, class balance and augmentation seeds depend on
the seed and the epoch only, so resuming reproduces an uninterrupted run. Under DDP (the
Trainer made with `use_distributed_sampler=False`) it gives each rank its share, and val/test
give each rank its own share with no item repeated, so metrics gathered over ranks are exact.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler

from effft.data.cache import ImageCache, build_cache
from effft.data.config import DataConfig, default_cache_dir
from effft.data.decode import image_size
from effft.data.samplers import EpochSampler
from effft.data.scan import format_bad_files, scan
from effft.data.sources import adapter
from effft.data.sources.base import SPLITS, BadFile, Item, Source, Task
from effft.data.splits import apply_splits, assign_splits, read_splits, strata, write_splits
from effft.data.transforms import apply, build_pipeline, eval_resize
from effft.errors import EffftError
from effft.model.tags import Preprocessing

log = logging.getLogger(__name__)

SIZE_SAMPLE = 200  # images whose size `summary()` reads


class ImageDataset(Dataset):
    """Items of one split through one pipeline: (image tensor, target, index)."""

    def __init__(self, items: list[Item], *, source: Source, pipeline: Any, channels: int,
                 multilabel: bool, cache: ImageCache | None = None,
                 cache_index: list[int] | None = None) -> None:
        self.items, self.source, self.pipeline = items, source, pipeline
        self.channels, self.multilabel = channels, multilabel
        self.cache, self.cache_index = cache, cache_index

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> np.ndarray:
        """The item's pixels before the pipeline (from the cache when there is one)."""
        if self.cache is not None:
            return self.cache[self.cache_index[i]]
        return self.source.read(self.items[i], self.channels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        if isinstance(key, tuple):  # (index, augmentation seed) from the EpochSampler
            i, seed = key
            self.reseed(seed)
        else:
            i = key
        x = apply(self.pipeline, self.image(i), self.channels)
        t = self.items[i].target
        y = torch.tensor(t, dtype=torch.float32 if self.multilabel else torch.int64)
        return x, y, i

    def reseed(self, seed: int) -> None:
        """Give the pipeline the random state `seed` determines: one numpy and one Python
        generator, shared by all its transforms (seeding each transform anew costs a quarter of
        the time a small image takes through the pipeline)."""
        seed %= 2**32
        rng, py_random = np.random.default_rng(seed), random.Random(seed)
        pipelines = [self.pipeline]
        while pipelines:
            compose = pipelines.pop()
            compose.seed, compose.random_generator, compose.py_random = seed, rng, py_random
            for t in compose.transforms:
                if isinstance(t, A.BaseCompose):
                    pipelines.append(t)
                else:
                    t.set_random_state(rng, py_random)


def _seed_worker(worker_id: int) -> None:
    # the pipeline's random state was copied into every worker: give each its own
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(info.seed)


def _normpath(path: str) -> str:
    return os.path.normpath(path)


class EffftDataModule(L.LightningDataModule):
    """Items, splits, pipelines and loaders for one data set (see the module docstring)."""

    def __init__(self, cfg: DataConfig, *, preprocessing: Preprocessing, in_chans: int = 3,
                 seed: int = 0, run_dir: Path | None = None, splits_file: Path | None = None,
                 progress: bool = True) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.cfg, self.preprocessing, self.in_chans = cfg, preprocessing, in_chans
        self.seed, self.run_dir, self.splits_file = seed, run_dir, splits_file
        self.progress = progress
        self.image_size = cfg.image_size or preprocessing.input_size
        self.source: Source | None = None
        self.items: list[Item] = []
        self.bad: list[BadFile] = []
        self.classes: list[str] = []
        self.task: Task = "multiclass"
        self.num_classes = 0
        self._cache: ImageCache | None = None
        self._datasets: dict[str, ImageDataset] = {}

    # ------------------------------------------------------------------ source and splits

    def prepare_source(self) -> None:
        """Load the adapter, scan for bad files and split (once)."""
        if self.source is not None:
            return
        module = adapter(self.cfg.adapter)
        source = module.load(self.cfg.root, self.cfg.options, channels=self.in_chans)
        items = self._drop_bad(source)
        if self.splits_file is not None:
            items = apply_splits(items, read_splits(self.splits_file), source=self.splits_file)
        else:
            items = assign_splits(items, self.cfg.split, seed=self.seed)
        self.source, self.items = source, items
        self.classes, self.task = list(source.classes), source.task
        self.num_classes = len(self.classes)
        self._check_splits()
        if self.run_dir is not None and rank_zero_only.rank == 0:  # once under DDP
            self.write_run_files(self.run_dir)

    def _drop_bad(self, source: Source) -> list[Item]:
        files = sorted({it.path for it in source.items if "::" not in it.path})
        bad = list(source.bad) + scan(files, progress=self.progress)
        self.bad = bad
        if not bad:
            return list(source.items)
        summary = format_bad_files(bad)
        if self.cfg.on_bad_file == "error":
            raise EffftError(f"{summary}\nFix or remove these files, or set data.on_bad_file: "
                             "skip to train without them")
        log.warning("%s\nThese are left out (data.on_bad_file: skip)%s", summary,
                    f"; the list is in {self.run_dir}/bad_files.csv" if self.run_dir else "")
        gone = {_normpath(b.path) for b in bad}
        items = [it for it in source.items if _normpath(it.path) not in gone]
        if not items:
            raise EffftError(f"every file of the data set at {self.cfg.root} is unreadable")
        return items

    def _check_splits(self) -> None:
        if not self.split_items("train"):
            raise EffftError("the train split is empty: add images or change data.split")
        counts = self.class_counts()
        absent = [c for c in self.classes if counts["train"].get(c, 0) == 0]
        if absent:
            log.warning("class(es) %s have no training images: the model cannot learn them",
                        absent)
        for split in ("val", "test"):
            if not self.split_items(split):
                log.warning("the %s split is empty", split)

    def split_items(self, split: str) -> list[Item]:
        """The items of `split`, in the order batches index them."""
        return [it for it in self.items if it.split == split]

    def class_counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: items}} (multi-label: items with that label)."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            targets = [it.target for it in self.split_items(split)]
            if self.task == "multilabel":
                sums = np.sum(targets, axis=0) if targets else np.zeros(len(self.classes))
                out[split] = {c: int(n) for c, n in zip(self.classes, sums)}
            else:
                n = Counter(targets)
                out[split] = {c: n.get(i, 0) for i, c in enumerate(self.classes)}
        return out

    # ------------------------------------------------------------------ datasets

    def cache_short_side(self) -> int:
        """The shorter side images are cached at: what the eval resize needs, at least."""
        return max(self.image_size, eval_resize(self.image_size, self.preprocessing.crop_pct))

    def _build_cache(self) -> None:
        if self.cfg.cache == "off" or self._cache is not None:
            return
        self._cache = build_cache(
            self.items, self.source, channels=self.in_chans, short_side=self.cache_short_side(),
            mode=self.cfg.cache, cache_dir=self.cfg.cache_dir or default_cache_dir(),
            progress=self.progress)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before setup(): the disk cache is built
        # here once rather than by every rank
        self.prepare_source()
        if self.cfg.cache == "disk":
            self._build_cache()

    def setup(self, stage: str | None = None) -> None:
        """The datasets of every split (and the image cache, when asked for)."""
        self.prepare_source()
        if self._datasets:
            return
        self._build_cache()
        position = {id(it): i for i, it in enumerate(self.items)}
        for split in SPLITS:
            items = self.split_items(split)
            self._datasets[split] = ImageDataset(
                items, source=self.source, channels=self.in_chans,
                multilabel=self.task == "multilabel", cache=self._cache,
                cache_index=[position[id(it)] for it in items],
                pipeline=build_pipeline(
                    train=split == "train", preprocessing=self.preprocessing,
                    in_chans=self.in_chans, image_size=self.image_size,
                    entries=self.cfg.augment.train if split == "train" else self.cfg.augment.eval))
        # each rank augments with its own random state (workers reseed in _seed_worker)
        self._datasets["train"].reseed(self.seed + self._world()[1])

    def dataset(self, split: str) -> ImageDataset:
        self.setup()
        return self._datasets[split]

    # ------------------------------------------------------------------ loaders

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, split: str, sampler: Sampler | None, shuffle: bool) -> DataLoader:
        workers = self.cfg.workers()
        _, rank = self._world()
        return DataLoader(
            self.dataset(split), batch_size=self.cfg.batch_size, sampler=sampler,
            shuffle=shuffle, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(), worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(self.seed + rank))

    def train_sampler(self) -> EpochSampler:
        """What the train loader draws with: (index, augmentation seed) per item."""
        world, rank = self._world()
        weights = self.sample_weights() if self.cfg.sampler == "balanced" else None
        return EpochSampler(len(self.dataset("train")), seed=self.seed, weights=weights,
                            num_replicas=world, rank=rank)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train_sampler(), shuffle=False)

    def _eval_loader(self, split: str) -> DataLoader:
        world, rank = self._world()
        sampler = None
        if world > 1:
            sampler = UnrepeatedDistributedSampler(self.dataset(split), num_replicas=world,
                                                   rank=rank, shuffle=False)
        return self._loader(split, sampler, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # ------------------------------------------------------------------ imbalance

    def sample_weights(self) -> torch.Tensor:
        """Per train item 1 / (items of its class): classes drawn evenly (multi-label: by
        each item's rarest label)."""
        y = strata(self.split_items("train"))
        counts = Counter(y.tolist())
        return torch.tensor([1.0 / counts[v] for v in y.tolist()], dtype=torch.double)

    def class_weights(self) -> torch.Tensor:
        """Inverse class frequency in the train split, mean 1 over the classes present there
        (a class without training items gets 0). Multi-label: by positives per label."""
        counts = torch.tensor(list(self.class_counts()["train"].values()), dtype=torch.float32)
        present = counts > 0
        w = torch.zeros_like(counts)
        w[present] = 1.0 / counts[present]
        return w / w[present].mean()

    def pos_weight(self) -> torch.Tensor:
        """negatives / positives per label in the train split (1 where a label has no
        positives); for binary data, one value for the second class."""
        n = len(self.split_items("train"))
        pos = torch.tensor(list(self.class_counts()["train"].values()), dtype=torch.float32)
        if self.task == "binary":
            pos = pos[1:]
        elif self.task != "multilabel":
            raise ValueError("pos_weight is for binary and multi-label data")
        return torch.where(pos > 0, (n - pos) / pos.clamp(min=1), torch.ones_like(pos))

    # ------------------------------------------------------------------ reports

    def image_size_stats(self, sample: int = SIZE_SAMPLE) -> dict[str, Any]:
        """min / median / max of width and height over an evenly spaced sample of items."""
        items = self.items[:: max(1, len(self.items) // sample)][:sample]
        sizes = []
        for it in items:
            try:
                if "::" in it.path or it.frame is not None:
                    h, w = self.source.read(it, self.in_chans).shape[:2]
                else:
                    w, h = image_size(it.path)
            except EffftError as e:
                log.debug("size of %s unknown: %s", it.path, e)
                continue
            sizes.append((w, h))
        if not sizes:
            return {"sampled": 0}
        a = np.array(sizes)
        stats = {k: {"min": int(a[:, j].min()), "median": float(np.median(a[:, j])),
                     "max": int(a[:, j].max())} for j, k in enumerate(("width", "height"))}
        return {"sampled": len(sizes), **stats}

    def summary(self) -> dict[str, Any]:
        """Classes, items per split and class, image sizes, bad files: for `effft info`."""
        self.prepare_source()
        counts = self.class_counts()
        return {
            "adapter": self.cfg.adapter,
            "root": str(self.cfg.root),
            "task": self.task,
            "classes": self.classes,
            "items": {s: len(self.split_items(s)) for s in SPLITS},
            "counts": counts,
            "image_size": self.image_size_stats(),
            "bad_files": [{"path": b.path, "reason": b.reason} for b in self.bad],
            # the face adapter's photos where no face was found (used whole, or left out)
            "no_face": [{"path": b.path, "reason": b.reason}
                        for b in getattr(self.source, "no_face_files", [])],
        }

    def write_run_files(self, run_dir: Path) -> None:
        """splits.csv, classes.json and bad_files.csv in `run_dir`."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_splits(run_dir / "splits.csv", self.items, self.classes)
        (run_dir / "classes.json").write_text(json.dumps(
            {"classes": self.classes, "task": self.task}, indent=2))
        write_bad_files(run_dir / "bad_files.csv", self.bad)


def write_bad_files(path: Path, bad: list[BadFile]) -> None:
    """`bad_files.csv`: path, reason (a header only when there are none)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows([b.path, b.reason] for b in bad)
