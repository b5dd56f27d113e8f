"""The `data:` section of a recipe.

Validators raise ValueError with the reason; pydantic adds where (e.g.
`data.augment.train.2`), and the recipe loader turns both into one message.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo,
                      field_serializer, field_validator, model_validator)

from effft.data.sources import ADAPTERS
from effft.data.sources import folder as _folder
from effft.data.sources import medmnist as _medmnist
from effft.data.sources import table as _table
from effft.data.transforms import build_transform

log = logging.getLogger(__name__)


class _Loose(BaseModel):
    """Stand-in for the options of an adapter whose module cannot be imported here."""

    model_config = ConfigDict(extra="allow")


def _options(name: str) -> type[BaseModel]:
    # dicom/face may need optional packages to import; their keys are then checked when the
    # adapter is loaded (which also says which extra to install)
    try:
        return importlib.import_module(ADAPTERS[name]).Options
    except ImportError as e:
        log.debug("options of the %s adapter not checked here: %s", name, e)
        return _Loose


_DicomOptions = _options("dicom")
_FaceOptions = _options("face")
OPTIONS: dict[str, type[BaseModel]] = {
    "folder": _folder.Options, "csv": _table.Options, "medmnist": _medmnist.Options,
    "dicom": _DicomOptions, "face": _FaceOptions,
}


class SplitConfig(BaseModel):
    """`data.split`: how a pool of items without a ready split is divided."""

    model_config = ConfigDict(extra="forbid")

    train: float = Field(0.8, gt=0, le=1)
    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: int | None = None
    """Seed of the split (default: the run's seed)."""
    stratify: bool = True
    """Keep class proportions alike in every split (multi-label: by each item's rarest label)."""
    group: bool = True
    """Keep each group (patient, person) in one split, where the adapter gives groups."""
    folds: int | None = Field(None, ge=2)
    """k-fold cross-validation: the non-test pool is cut into `folds` parts ..."""
    fold: int | None = Field(None, ge=0)
    """... and part `fold` (0 .. folds-1) is the val set; train and val fractions are unused."""

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {self.train} + {self.val} + "
                             f"{self.test} = {total:g}")
        if (self.folds is None) != (self.fold is None):
            raise ValueError("cross-validation needs both folds (how many) and fold (which one, "
                             "0 .. folds-1)")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"fold must be 0 .. {self.folds - 1} for folds: {self.folds}, got "
                             f"{self.fold}")
        return self


def _transform_entry(entry: Any) -> Any:
    build_transform(entry)  # raises ValueError naming the transform and argument
    return {entry: {}} if isinstance(entry, str) else entry


# one `{Name: {arg: value}}`; a list of them keeps each entry's index in error locations
TransformEntry = Annotated[Any, AfterValidator(_transform_entry)]


class AugmentConfig(BaseModel):
    """`data.augment`: "default" (from the weights' preprocessing) or a list of transforms."""

    model_config = ConfigDict(extra="forbid")

    train: list[TransformEntry] | None = None
    eval: list[TransformEntry] | None = None

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _default_or_list(cls, v: Any) -> Any:
        if v is None or v == "default":
            return None
        if not isinstance(v, list):
            raise ValueError(f'expected "default" or a list of transforms such as '
                             f'[{{HorizontalFlip: {{p: 0.5}}}}], got {v!r}')
        return v

    @field_serializer("train", "eval")
    def _dump(self, v: list | None) -> Any:
        return "default" if v is None else v


def default_num_workers() -> int:
    """Data loader processes: one core is left to the training loop, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cores or 1) - 1))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "effft" / "data"


class DataConfig(BaseModel):
    """`data`: where the images are, how they are split, augmented, cached and batched."""

    model_config = ConfigDict(extra="forbid")

    adapter: Literal["folder", "csv", "medmnist", "dicom", "face"]
    root: Path
    folder: _folder.Options | None = None
    csv: _table.Options | None = None
    medmnist: _medmnist.Options | None = None
    dicom: _DicomOptions | None = None  # type: ignore[valid-type]
    face: _FaceOptions | None = None  # type: ignore[valid-type]
    image_size: int | None = Field(None, ge=16, le=2048)
    """Input size (default: the weights' input size)."""
    batch_size: int = Field(32, gt=0)
    num_workers: int | None = Field(None, ge=0)
    """Data loader processes (default: cores - 1, at most 8)."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    sampler: Literal["none", "balanced"] = "none"
    cache: Literal["off", "disk", "ram"] = "off"
    cache_dir: Path | None = None
    """Where `cache: disk` keeps decoded images (default: ~/.cache/effft/data)."""
    on_bad_file: Literal["skip", "error"] = "skip"

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as false
        return "off" if v is False else v

    @field_validator(*ADAPTERS, mode="after")
    @classmethod
    def _section_of_adapter(cls, v: Any, info: ValidationInfo) -> Any:
        adapter = info.data.get("adapter")
        if v is not None and adapter is not None and info.field_name != adapter:
            raise ValueError(f"this section is for adapter {info.field_name}, but adapter is "
                             f"{adapter!r}: remove data.{info.field_name} or set adapter: "
                             f"{info.field_name}")
        return v

    @model_validator(mode="after")
    def _default_section(self) -> DataConfig:
        if getattr(self, self.adapter) is None:
            try:
                setattr(self, self.adapter, OPTIONS[self.adapter]())
            except ValueError as e:
                raise ValueError(f"the {self.adapter} adapter needs a data.{self.adapter} "
                                 f"section: {e}") from None
        return self

    @property
    def options(self) -> BaseModel:
        """The options of the chosen adapter."""
        return getattr(self, self.adapter)

    def workers(self) -> int:
        return default_num_workers() if self.num_workers is None else self.num_workers
