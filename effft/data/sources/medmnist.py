"""The `medmnist` adapter: a MedMNIST `.npz` file with its own train/val/test split.

The file holds `train_images` (N,H,W) grey or (N,H,W,3) colour uint8 and `train_labels` (N,1)
with a class index, or (N,L) with 0/1 per label for multi-label sets (ChestMNIST: 14), and the
same for `val_` and `test_`. Items keep the file's split and are named "<file>::<split>/<index>".
Class names come from `data.medmnist.classes`, else they are numbered "0", "1", ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from effft.data.decode import BadImageError
from effft.data.sources._common import SPLITS, Item, Source
from effft.errors import EffftError


class Options(BaseModel):
    """Keys of `data.medmnist`."""

    model_config = ConfigDict(extra="forbid")

    file: Path | None = None
    """The .npz, relative to data.root; omit when data.root is the file itself."""
    classes: list[str] | None = None
    """Class names, in the order of the label indices (or label columns)."""


def split_item_path(path: str) -> tuple[str, str, int]:
    """"<file>::<split>/<index>" -> (file, split, index)."""
    file, _, rest = path.rpartition("::")
    split, _, index = rest.partition("/")
    return file, split, int(index)


@dataclass
class MedMNISTSource(Source):
    """Images held as arrays in one .npz file."""

    file: str = ""
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    in_memory: ClassVar[bool] = True

    def images(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            with np.load(self.file, allow_pickle=False) as z:
                self._arrays[split] = z[f"{split}_images"]
        return self._arrays[split]

    def read(self, item: Item, channels: int) -> np.ndarray:
        _, split, index = split_item_path(item.path)
        try:
            img = self.images(split)[index]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise BadImageError(item.path, f"cannot read it from the .npz file ({e})") from e
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[2] == channels:
            return np.ascontiguousarray(img)
        if channels == 3:
            return np.repeat(img, 3, axis=2)
        # ITU-R 601 luma, as for decoded image files
        grey = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[:, :, None]

    def __getstate__(self) -> dict:
        # data loader workers re-open the file rather than receive copies of the arrays
        return {**self.__dict__, "_arrays": {}}


def _npz_path(root: Path, options: Options) -> Path:
    path = root / options.file if options.file is not None else root
    if path.is_dir():
        found = sorted(path.glob("*.npz"))
        if len(found) != 1:
            listed = f" (found: {', '.join(p.name for p in found)})" if found else ""
            raise EffftError(f"data.root {path} is a folder: name the .npz file in it with "
                             f"data.medmnist.file{listed}")
        path = found[0]
    if not path.is_file():
        raise EffftError(f"MedMNIST file {path} does not exist: set data.root to the .npz file "
                         "(or to its folder and data.medmnist.file to its name)")
    return path


def _labels(z: np.lib.npyio.NpzFile, split: str, path: Path) -> np.ndarray | None:
    key_i, key_l = f"{split}_images", f"{split}_labels"
    if key_i not in z.files and key_l not in z.files:
        return None
    if key_i not in z.files or key_l not in z.files:
        raise EffftError(f"{path} has {key_i if key_i in z.files else key_l} without "
                         f"{key_l if key_i in z.files else key_i}; is it a MedMNIST file?")
    labels = z[key_l]
    n = z[key_i].shape[0]
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != n:
        raise EffftError(f"{path}: {key_l} has shape {labels.shape}, expected ({n}, 1) or "
                         f"({n}, number of labels) to match {key_i}")
    return labels.astype(np.int64)


def load(root: Path, options: Options, *, channels: int) -> Source:
    """Items from the train/val/test arrays of a MedMNIST .npz file."""
    path = _npz_path(Path(root).expanduser(), options)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        # numpy reads any file that is no zip archive as a pickle, and refuses it: that file is
        # not a .npz, whatever numpy suggests
        reason = "it is not a NumPy .npz archive" if "pickle" in str(e) else str(e)
        raise EffftError(f"cannot read {path} as a .npz file: {reason}; give a MedMNIST file such as "
                         "breastmnist.npz (see datasets/README.md)") from None
    with z:
        labels = {s: lab for s in SPLITS if (lab := _labels(z, s, path)) is not None}
    if "train" not in labels:
        raise EffftError(f"{path} has no train_images/train_labels (keys: {sorted(z.files)}); "
                         "is it a MedMNIST file?")
    widths = {lab.shape[1] for lab in labels.values()}
    if len(widths) != 1:
        raise EffftError(f"{path}: the label arrays differ in width between splits ({widths})")
    width = widths.pop()
    multilabel = width > 1
    for split, lab in labels.items():
        if lab.size and (lab.min() < 0 or multilabel and lab.max() > 1):
            raise EffftError(f"{path}: {split}_labels holds {lab.min()}..{lab.max()}; expected "
                             "class indices from 0 (or 0/1 per label for multi-label)")
    n_classes = width if multilabel else int(max(lab.max() for lab in labels.values())) + 1
    classes = _classes(options, n_classes, path, multilabel)
    items = []
    for split, lab in labels.items():
        for i, row in enumerate(lab):
            target = tuple(int(v) for v in row) if multilabel else int(row[0])
            items.append(Item(path=f"{path}::{split}/{i}", target=target, split=split))
    task = "multilabel" if multilabel else "binary" if len(classes) == 2 else "multiclass"
    return MedMNISTSource(items=items, classes=classes, task=task, file=str(path))


def _classes(options: Options, n: int, path: Path, multilabel: bool) -> list[str]:
    if not multilabel and n < 2:
        raise EffftError(f"{path} has one class (every label is 0); a classifier needs two")
    if options.classes is None:
        return [str(i) for i in range(n)]
    if multilabel and len(options.classes) != n or not multilabel and len(options.classes) < n:
        what = f"{n} label columns" if multilabel else f"labels up to {n - 1}"
        raise EffftError(f"data.medmnist.classes names {len(options.classes)} classes but {path} "
                         f"has {what}: give one name per class")
    return list(options.classes)
