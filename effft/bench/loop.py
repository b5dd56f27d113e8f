"""The reference of `effft bench quality`: the fine-tuning loop a careful user writes by hand.

timm's model with the same weights, torchvision's transforms (a random resized crop and a flip
for training; resize and centre crop as the weights want for evaluation, with their mean and
std), AdamW with a one-cycle schedule, cross-entropy, the weights of the last epoch, and the
argmax of the softmax. It trains on the train split of an effft run's `splits.csv` and predicts
its test split, so both see the same images. Run as its own process:

    python -m effft.bench.loop config.json

`config.json` says where the split is and the settings (see `LoopConfig`); the test split's
probabilities and targets are written to `config["out"]` (.npz). It needs the `bench` extra
(torchvision).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LR = 1e-3  # AdamW's one-cycle peak: the usual first choice for fine-tuning
WEIGHT_DECAY = 0.01  # AdamW's own default


@dataclass
class LoopConfig:
    splits: str  # an effft run's splits.csv
    classes: list[str]
    arch: str  # timm's model name
    weights: str  # a timm-layout state dict (.safetensors) of the pretrained weights
    size: int
    mean: list[float]
    std: list[float]
    crop_pct: float
    interpolation: str
    epochs: int
    batch_size: int
    workers: int
    threads: int
    seed: int
    out: str


class _Images(torch.utils.data.Dataset):
    """(image, label) from paths, or from the arrays of a .npz file (`<file>::<split>/<index>`)."""

    def __init__(self, rows: list[tuple[str, int]], transform: Any) -> None:
        self.rows, self.transform = rows, transform
        self.arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self, path: str) -> Image.Image:
        if "::" not in path:
            with Image.open(path) as im:
                return im.convert("RGB")
        file, _, rest = path.rpartition("::")
        split, _, index = rest.partition("/")
        if split not in self.arrays:
            with np.load(file) as z:
                self.arrays[split] = z[f"{split}_images"]
        return Image.fromarray(self.arrays[split][int(index)]).convert("RGB")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.rows[i]
        return self.transform(self._open(path)), label


def _rows(splits: Path, classes: list[str], split: str) -> list[tuple[str, int]]:
    with open(splits, newline="", encoding="utf-8") as f:
        return [(r["path"], classes.index(r["label"])) for r in csv.DictReader(f) if r["split"] == split]


def train_and_predict(cfg: LoopConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train as the module docstring says; (test probabilities (N, C), test targets (N,))."""
    import timm
    from safetensors.torch import load_file
    from torchvision import transforms as T

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    interpolation = T.InterpolationMode(cfg.interpolation)
    normalize = T.Normalize(cfg.mean, cfg.std)
    train_tf = T.Compose([T.RandomResizedCrop(cfg.size, interpolation=interpolation), T.RandomHorizontalFlip(),
                          T.ToTensor(), normalize])
    eval_tf = T.Compose([T.Resize(int(cfg.size / cfg.crop_pct), interpolation=interpolation),
                         T.CenterCrop(cfg.size), T.ToTensor(), normalize])

    model = timm.create_model(cfg.arch, num_classes=1000)
    model.load_state_dict(load_file(cfg.weights))
    model.reset_classifier(len(cfg.classes))

    train = torch.utils.data.DataLoader(_Images(_rows(Path(cfg.splits), cfg.classes, "train"), train_tf),
                                        batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
                                        persistent_workers=cfg.workers > 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=cfg.epochs * len(train))
    for _ in range(cfg.epochs):
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()

    test = torch.utils.data.DataLoader(_Images(_rows(Path(cfg.splits), cfg.classes, "test"), eval_tf),
                                       batch_size=cfg.batch_size, num_workers=cfg.workers)
    model.eval()
    probs, targets = [], []
    with torch.no_grad():
        for x, y in test:
            probs.append(model(x).softmax(-1))
            targets.append(y)
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()


def main() -> None:
    cfg = LoopConfig(**json.loads(Path(sys.argv[1]).read_text()))
    probs, targets = train_and_predict(cfg)
    np.savez(cfg.out, probs=probs, targets=targets)


if __name__ == "__main__":
    main()
