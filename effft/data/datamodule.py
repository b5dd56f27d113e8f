"""From a loaded, split data set and the run's InputSpec to batches: effft's LightningDataModule.

The DataModule is built last in the data chain, from what is already decided: the items and
their splits (`dataset.load_data`) and the InputSpec (size, channels, mean, std, crop). It only
makes datasets, the image cache and loaders. Batches are `(images, targets, indices)`: images
float32 [B, C, H, W] normalised, targets int64 [B] (binary, multi-class) or float32 [B, L]
(multi-label), and each item's position in `data.split_items(split)`, so reports can name files.

Training draws from an `EpochSampler`: order, class balance and augmentation seeds depend on
the seed and the epoch only, so resuming reproduces an uninterrupted run. Under DDP (the
Trainer made with `use_distributed_sampler=False`) it gives each rank its share, and val/test
give each rank its own share with no item repeated, so metrics gathered over ranks are exact.
"""

from __future__ import annotations

import random
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from ..input import InputSpec
from .batches import EvalBatches, TrainBatches, prepare, whole
from .cache import ImageCache, available_memory, build_cache, cache_bytes, check_cache_dir, default_cache_dir
from .dataset import LoadedData
from .samplers import EpochBatches, EpochSampler
from .sources._common import SPLITS, Item, Source
from .transforms import TRAIN_SCALE, apply, build_pipeline


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


def check_disk_cache(data: LoadedData, spec: InputSpec) -> None:
    """`data.cache: disk`: the cache of these images, at the size `EffftDataModule` caches them,
    is there whole or can be written; checked before anything is written."""
    cfg = data.cfg
    if cfg.cache != "disk":
        return
    what = "data.cache_dir" if cfg.cache_dir else \
        "the image cache folder (data.cache_dir, by default $XDG_CACHE_HOME/effft/data or ~/.cache/effft/data)"
    check_cache_dir(data.items, channels=spec.channels, short_side=spec.resize,
                    cache_dir=cfg.cache_dir or default_cache_dir(), what=what)


def _seed_worker(worker_id: int) -> None:
    # the pipeline's random state was copied into every worker: give each its own
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(info.seed)


class EffftDataModule(L.LightningDataModule):
    """Datasets, pipelines and loaders for a loaded data set (see the module docstring)."""

    def __init__(self, data: LoadedData, spec: InputSpec, *, seed: int = 0, progress: bool = True) -> None:
        super().__init__()
        if spec.channels != data.channels:
            raise ValueError(f"the data were read with {data.channels} channel(s), the input has {spec.channels}")
        self.data, self.spec, self.cfg = data, spec, data.cfg
        self.seed, self.progress = seed, progress
        self.cache = self._cache_mode()
        self._cache: ImageCache | None = None
        self._datasets: dict[str, ImageDataset] = {}

    # ------------------------------------------------------------------ datasets

    def cache_short_side(self) -> int:
        """The shorter side images are cached at: what the eval resize needs, at least
        (`check_disk_cache` checks the cache of this size)."""
        return self.spec.resize

    @property
    def default_augment(self) -> bool:
        return self.cfg.augment.train is None and self.cfg.augment.eval is None

    @property
    def lean(self) -> bool:
        """Whether batches are made whole in this process from images held in memory (see
        `batches.py`): the default augmentation, and a source in memory or a cache of the images."""
        return self.default_augment and (self.data.source.in_memory or self.cache != "off")

    def _cache_mode(self) -> str:
        """`data.cache` with auto decided: ram where the train images, decoded at the size they are
        cached at, take at most a quarter of the free memory (8 GiB at most)."""
        if self.cfg.cache != "auto":
            return self.cfg.cache
        if self.data.source.in_memory or not self.default_augment:
            return "off"
        need = cache_bytes(self.data.split_items("train"), short_side=self.cache_short_side(),
                           channels=self.spec.channels)
        return "ram" if need is not None and need <= min(available_memory() // 4, 8 << 30) else "off"

    def _cached_items(self) -> list[Item]:
        # the lean path caches the train images only: val and test are prepared once, from the files
        return self.data.split_items("train") if self.lean else self.data.items

    def _build_cache(self) -> None:
        if self.cache == "off" or self._cache is not None or (self.lean and self.data.source.in_memory):
            return
        self._cache = build_cache(
            self._cached_items(), self.data.source, channels=self.spec.channels, short_side=self.cache_short_side(),
            mode=self.cache, cache_dir=self.cfg.cache_dir or default_cache_dir(), progress=self.progress)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before setup(): the disk cache is built
        # here once rather than by every rank (the cache lives in files, not in this object)
        if self.cache == "disk" and not (self.lean and self.data.source.in_memory):
            build_cache(self._cached_items(), self.data.source, channels=self.spec.channels,
                        short_side=self.cache_short_side(), mode="disk",
                        cache_dir=self.cfg.cache_dir or default_cache_dir(), progress=self.progress)

    def setup(self, stage: str | None = None) -> None:
        """The datasets of every split (and the image cache, when asked for)."""
        if self._datasets:
            return
        self._build_cache()
        if self.lean:
            self._setup_lean()
            return
        for split in SPLITS:
            self._datasets[split] = self._image_dataset(split, train=split == "train")
        # each rank augments with its own random state (workers reseed in _seed_worker)
        self._datasets["train"].reseed(self.seed + self._world()[1])

    def _image_dataset(self, split: str, *, train: bool) -> ImageDataset:
        """`split`'s items through the train pipeline or the eval one, read from the image cache
        where it holds them (the lean path caches the train images only)."""
        position = {id(it): i for i, it in enumerate(self._cached_items())}
        items = self.data.split_items(split)
        cached = self._cache is not None and all(id(it) in position for it in items)
        return ImageDataset(items, source=self.data.source, channels=self.spec.channels,
                            multilabel=self.data.task == "multilabel", cache=self._cache if cached else None,
                            cache_index=[position[id(it)] for it in items] if cached else None,
                            pipeline=build_pipeline(train=train, spec=self.spec,
                                                    entries=self.cfg.augment.train if train else self.cfg.augment.eval))

    def _setup_lean(self) -> None:
        source, channels, multilabel = self.data.source, self.spec.channels, self.data.task == "multilabel"
        train = self.data.split_items("train")
        cache = self._cache

        def train_image(i: int) -> np.ndarray:
            return cache[i] if cache is not None else source.read(train[i], channels)

        self._datasets["train"] = TrainBatches(train_image, [it.target for it in train], spec=self.spec,
                                               scale=TRAIN_SCALE, multilabel=multilabel)
        geometry = build_pipeline(train=False, entries=None, spec=self.spec, tensor=False)
        for split in ("val", "test"):
            items = self.data.split_items(split)
            prepared = prepare(lambda i, items=items: source.read(items[i], channels), len(items),
                               lambda image: geometry(image=image)["image"], size=self.spec.size, channels=channels)
            self._datasets[split] = EvalBatches(prepared, [it.target for it in items], spec=self.spec,
                                                multilabel=multilabel)

    def dataset(self, split: str) -> Dataset:
        self.setup()
        return self._datasets[split]

    # ------------------------------------------------------------------ loaders

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, split: str, sampler: Sampler | None, shuffle: bool) -> DataLoader:
        _, rank = self._world()
        if self.lean:  # whole batches made here: no loader process
            if not isinstance(sampler, EpochSampler):
                sampler = BatchSampler(sampler or SequentialSampler(self.dataset(split)), self.cfg.batch_size,
                                       drop_last=False)
            else:
                sampler = EpochBatches(sampler, self.cfg.batch_size)
            return DataLoader(self.dataset(split), batch_sampler=sampler, num_workers=0, collate_fn=whole,
                              pin_memory=torch.cuda.is_available())
        workers = self.cfg.workers()
        # training: the EpochSampler's items in batches, a last batch of one image merged (see EpochBatches)
        batches = dict(batch_sampler=EpochBatches(sampler, self.cfg.batch_size)) if isinstance(sampler, EpochSampler) \
            else dict(batch_size=self.cfg.batch_size, sampler=sampler, shuffle=shuffle)
        return DataLoader(
            self.dataset(split), **batches, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(), worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(self.seed + rank))

    def train_sampler(self) -> EpochSampler:
        """What the train loader draws with: (index, augmentation seed) per item."""
        world, rank = self._world()
        weights = self.data.sample_weights() if self.cfg.sampler == "balanced" else None
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

    def unaugmented_loader(self, split: str) -> DataLoader:
        """`split`'s images through the eval pipeline, in order and whole on every process (not
        shared out among them): what a pass that must give every process the same result reads."""
        self.setup()  # the image cache, where the data module keeps one
        return DataLoader(self._image_dataset(split, train=False), batch_size=self.cfg.batch_size, shuffle=False,
                          num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
