"""Image files read for a trained run through a torch DataLoader, so that reading, decoding and
preprocessing (in `workers` processes) overlap the model's work in this one.

Each file is read as the run's data adapter read it (`LoadedRun.read`) and prepared with the
pipeline given. A file that cannot be read is not dropped: it travels in its batch as an error,
in order, so that every file given gets its row.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import EffftError
from .loaded_run import LoadedRun

Read = tuple[int, Tensor | None, bool | None, str | None]  # index, image, face found, error


@dataclass
class Batch:
    """Consecutive files of the list, as the loader hands them over."""

    index: list[int]  # each file's place in the list
    images: Tensor  # the readable files' tensors, stacked: (len(readable), C, H, W)
    readable: list[int]  # which files of the batch those are (positions in `index`)
    faces: list[bool | None]  # face runs: whether a face was found; else None
    errors: list[str | None]  # why a file could not be read; None for the readable ones

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True): page-locked memory for the copy to a GPU."""
        self.images = self.images.pin_memory()
        return self

    def __len__(self) -> int:
        return len(self.index)


class ImageFiles(Dataset):
    """The files of `paths` read as `run` reads them and prepared by `pipeline` (see the module)."""

    def __init__(self, run: LoadedRun, paths: Sequence[Path], pipeline: Any) -> None:
        self.run, self.paths, self.pipeline = run.for_reading(), paths, pipeline

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Read:
        from ..data.decode import BadImageError
        from ..data.transforms import apply

        try:
            image, face = self.run.read(self.paths[i])
        except BadImageError as exc:
            return i, None, None, exc.reason
        return i, apply(self.pipeline, image, self.run.in_chans), face, None


def collate(reads: list[Read]) -> Batch:
    readable = [k for k, (_, image, _, _) in enumerate(reads) if image is not None]
    images = torch.stack([reads[k][1] for k in readable]) if readable else torch.empty(0)
    return Batch(index=[r[0] for r in reads], images=images, readable=readable, faces=[r[2] for r in reads],
                 errors=[r[3] for r in reads])


def check_batch_size(batch_size: int) -> None:
    """--batch-size of predict and explain: at least one image."""
    if batch_size < 1:
        raise EffftError(f"--batch-size must be at least 1, got {batch_size}")


def default_workers(files: int, batch_size: int) -> int:
    """Loader processes when none are asked for: none for a single batch (starting a process
    costs more than reading it), else up to 4, leaving a core to the model."""
    from ..config.schema import default_num_workers

    return 0 if files <= batch_size else min(4, default_num_workers())


def read_batches(run: LoadedRun, paths: Sequence[Path], pipeline: Any, *, batch_size: int, workers: int,
                 pin_memory: bool = False) -> Iterator[Batch]:
    """The files in order, `batch_size` at a time, read by `workers` processes (0: this one).

    The workers start here, before the caller starts anything else (a progress bar's thread):
    forking a process that runs threads is what Python warns about."""
    loader = DataLoader(ImageFiles(run, paths, pipeline), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate, pin_memory=pin_memory)
    with warnings.catch_warnings():
        # torch's hint that more workers than cores were asked for: the user chose --workers
        warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes")
        return iter(loader)
