"""The train sampler: which items an epoch draws, in what order, with which augmentation seed.

Everything it yields depends on (seed, epoch, rank) only. Each item comes with a seed for its
augmentation, so a run resumed at an epoch boundary sees exactly the batches an uninterrupted
run would, whatever the number of loader workers and whether they persist across epochs.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import BatchSampler, Sampler


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (index, augmentation seed) for this rank's share of an epoch.

    Without `weights`, a permutation of all items; with them, `num_samples` draws with
    replacement in proportion to the weights (a class-balanced sampler). Under DDP the epoch is
    padded to a multiple of `num_replicas` with items from its start and dealt out round-robin,
    as torch's DistributedSampler does for training.
    """

    def __init__(self, num_items: int, *, seed: int, weights: torch.Tensor | None = None,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if num_items <= 0:
            raise ValueError("the train split is empty")
        self.num_items, self.seed, self.weights = num_items, seed, weights
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_items // self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.multinomial(self.weights, self.num_items, replacement=True, generator=g)
        seeds = torch.randint(0, 2**31 - 1, (self.num_items,), generator=g)
        total = len(self) * self.num_replicas
        if total > self.num_items:  # pad so every rank takes the same number of steps
            order = torch.cat([order, order[: total - self.num_items]])
            seeds = torch.cat([seeds, seeds[: total - self.num_items]])
        mine = slice(self.rank, total, self.num_replicas)
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))


def batch_count(items: int, batch_size: int) -> int:
    """How many batches `EpochBatches` makes of `items` items."""
    count = -(-items // batch_size)
    return count - 1 if count > 1 and items % batch_size == 1 else count


class EpochBatches(BatchSampler):
    """The sampler's items in batches of `batch_size`, in its order; a last batch of one item
    joins the batch before it. BatchNorm cannot train on one image whose last feature map is
    1x1 (inputs of 32 px and less), and one image is a poor estimate of a batch's statistics at
    any size. Batches depend on what the sampler yields only, hence on the seed and the epoch."""

    def __init__(self, sampler: EpochSampler, batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # a generator: the sampler is read at the first batch, after Lightning has set its epoch
        # (DataLoader makes this iterator before then)
        batches = list(super().__iter__())
        if self.batch_size > 1 and len(batches) > 1 and len(batches[-1]) == 1:
            last = batches.pop()
            batches[-1] += last
        yield from batches

    def __len__(self) -> int:
        return batch_count(len(self.sampler), self.batch_size)
