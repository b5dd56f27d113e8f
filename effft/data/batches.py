"""Batches made whole from images held decoded in memory: the lean path of the DataModule.

When the images are in memory (a MedMNIST file, or `data.cache` ram or disk) and the recipe
keeps the default augmentation, there is nothing left for loader processes to do but crop,
resize and flip, which costs little on tensors. So the train split is augmented a batch at a
time in the training process itself, and the val and test splits are prepared once, when the
data are set up, by the very eval pipeline `predict` uses, and kept as uint8 tensors. No loader
process takes cores from the training loop, and no image is decoded twice.

The train augmentation is the default one of `transforms.py`, done on tensors: a random resized
crop (the area kept drawn from `scale`, the aspect ratio from 3/4 to 4/3, as torchvision's
RandomResizedCrop), resized by OpenCV with the InputSpec's interpolation, a horizontal flip
with probability 1/2, and for colour images brightness, contrast and saturation each moved by up
to 20% with probability 1/2 (on the uint8 image, as albumentations' ColorJitter does). Each
item's draws come from its own seed (the EpochSampler's), so
an epoch's batches depend on the seed and the epoch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..input import InputSpec
from .transforms import interpolation

RATIO = (3 / 4, 4 / 3)
JITTER = 0.2  # brightness, contrast and saturation: a factor in 1 +- JITTER


def crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop keeping `scale` of the area at an aspect ratio in 3/4..4/3;
    after ten draws that do not fit, the largest centred crop of an allowed ratio."""
    area = height * width
    log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(log_low, log_high))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = min(max(width / height, RATIO[0]), RATIO[1])
    w, h = (width, round(width / ratio)) if width / height < ratio else (round(height * ratio), height)
    w, h = min(w, width), min(h, height)
    return (height - h) // 2, (width - w) // 2, h, w


class TrainBatches(Dataset):
    """The train split augmented a batch at a time (see the module docstring). Indexed by lists of
    (item, seed) pairs, as the DataLoader's `__getitems__` hands them over."""

    def __init__(self, image: Callable[[int], np.ndarray], targets: Sequence, *, spec: InputSpec,
                 scale: tuple[float, float], multilabel: bool) -> None:
        self.image, self.targets, self.spec, self.scale = image, list(targets), spec, scale
        self.dtype = torch.float32 if multilabel else torch.int64
        self.flag = interpolation(spec)

    def __len__(self) -> int:
        return len(self.targets)

    def _view(self, i: int, rng: np.random.Generator) -> np.ndarray:
        pixels = self.image(i)
        top, left, h, w = crop_box(rng, pixels.shape[0], pixels.shape[1], self.scale)
        view = pixels[top:top + h, left:left + w]
        if (h, w) != (self.spec.size, self.spec.size):
            view = cv2.resize(view, (self.spec.size, self.spec.size), interpolation=self.flag)
        if rng.random() < 0.5:
            view = cv2.flip(np.ascontiguousarray(view), 1)  # cv2.resize may have made a copy already
        view = view.reshape(self.spec.size, self.spec.size, -1)
        return jitter(view, rng) if view.shape[2] == 3 else view

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        views = np.stack([self._view(i, np.random.default_rng(seed % 2**32)) for i, seed in keys])
        x = normalise_uint8(torch.from_numpy(views).permute(0, 3, 1, 2), self.spec)
        y = torch.tensor([self.targets[i] for i, _ in keys], dtype=self.dtype)
        return x, y, torch.tensor([i for i, _ in keys])


def jitter(view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation of an RGB uint8 image, each moved by a factor in
    1 +- JITTER with probability 1/2: brightness and contrast as one table lookup, saturation as
    a blend with the grey image."""
    b, c, s = (rng.uniform(1 - JITTER, 1 + JITTER) if rng.random() < 0.5 else 1.0 for _ in range(3))
    if b != 1.0 or c != 1.0:
        # contrast pulls towards the mean grey of the brightened image: x -> c*b*x + (1-c)*b*m
        mean = float(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY).mean())
        table = np.clip(np.rint(c * b * np.arange(256) + (1 - c) * b * mean), 0, 255).astype(np.uint8)
        view = cv2.LUT(view, table)
    if s != 1.0:
        grey = cv2.cvtColor(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        view = cv2.addWeighted(view, s, grey, 1 - s, 0)
    return view


def normalise_uint8(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 pixels (B, C, H, W) to float, scaled to 0..1, minus the mean, over the std."""
    scale = torch.tensor([1 / (255 * s) for s in spec.std]).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std)]).view(1, -1, 1, 1)
    return x.float().mul_(scale).sub_(shift)


class EvalBatches(Dataset):
    """A val or test split prepared once by the eval pipeline and kept as uint8 tensors."""

    def __init__(self, prepared: torch.Tensor, targets: Sequence, *, spec: InputSpec, multilabel: bool) -> None:
        self.prepared, self.targets, self.spec = prepared, list(targets), spec
        self.dtype = torch.float32 if multilabel else torch.int64

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        y = torch.tensor([self.targets[i] for i in idx.tolist()], dtype=self.dtype)
        return normalise_uint8(self.prepared[idx], self.spec), y, idx


def prepare(image: Callable[[int], np.ndarray], count: int, pipeline: Callable[[np.ndarray], np.ndarray],
            *, size: int, channels: int, threads: int = 4) -> torch.Tensor:
    """(count, channels, size, size) uint8: each image through `pipeline` (an HWC uint8 image to
    an HWC uint8 image of the input size), in a few threads (OpenCV releases the GIL)."""
    out = torch.empty((count, channels, size, size), dtype=torch.uint8)

    def one(i: int) -> None:
        done = pipeline(image(i))
        out[i] = torch.from_numpy(np.ascontiguousarray(done.reshape(size, size, channels))).permute(2, 0, 1)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one, range(count)))
    return out


def whole(batch: tuple) -> tuple:
    """The DataLoader's collate for datasets that make whole batches: nothing left to do."""
    return batch
