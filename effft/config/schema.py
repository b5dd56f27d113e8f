"""What a recipe may say: every section and key, with its type, range and default.

A recipe is plain YAML in the user's words; `Recipe` validates it. Validators raise ValueError
with the reason; pydantic adds where (`data.augment.train.2`), and `config.load` turns both
into one message naming the key path.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_serializer,
                      field_validator, model_validator)

from ..data.sources import ADAPTERS
from ..data.sources import folder as _folder
from ..data.sources import medmnist as _medmnist
from ..data.sources import table as _table
from ..data.transforms import build_transform
from ..errors import UnknownModelError
from ..model.registry import get_variant, split_name
from . import trainer as trainer_args
from .space import check_entry

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- data


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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # `lr: .inf` is > 0, and trains on NaN

    train: float = Field(0.8, gt=0, le=1)
    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    """Seed of the split (default: the run's seed)."""
    stratify: bool = True
    """Keep class proportions alike in every split (multi-label: by each item's rarest label)."""
    group: bool = True
    """Keep each group (patient, person) in one split, where the adapter gives groups."""
    folds: int | None = Field(None, ge=2)
    """k-fold cross-validation: the non-test pool is cut into `folds` parts ..."""
    fold: int | None = Field(None, ge=0)
    """... and part `fold` (0 .. folds-1) is the val set; train and val fractions are unused."""
    by: Literal["item", "identity"] | None = None
    """What is kept whole in one split: item (each image on its own, or its group where `group`
    says), or identity (every image of a person in one split: the people of val and test are
    never seen in training). Default: identity for `task: embedding`, else item."""
    own_val: bool = True
    """A ready split with train and val but no test: the data's val is the test split and
    effft's validation (which picks the checkpoint, threshold and temperature) is cut from
    train, so the reported figures are honest. false: validate on the data's val and report it
    (optimistic figures, said loudly)."""

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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # `lr: .inf` is > 0, and trains on NaN

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


def _not_empty_path(v: Any) -> Any:
    # an empty path is the current folder to pathlib: `--set data.root=` would read everything under it
    if isinstance(v, str) and not v.strip():
        raise ValueError("empty: give a folder")
    return v


class DataConfig(BaseModel):
    """`data`: where the images are, how they are split, augmented, cached and batched."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # `lr: .inf` is > 0, and trains on NaN

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
    num_workers: int | None = Field(None, ge=0, le=64)
    """Data loader processes (default: cores - 1, at most 8)."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    sampler: Literal["none", "balanced"] = "none"
    cache: Literal["auto", "off", "disk", "ram"] = "auto"
    """Decoded images kept for the epochs after the first: in memory (ram), in files (disk), not at
    all (off); auto: in memory where they fit in a quarter of the free memory and the default
    augmentation is used (then batches are made in the training process), else off."""
    cache_dir: Path | None = None
    """Where `cache: disk` keeps decoded images (default: ~/.cache/effft/data)."""
    on_bad_file: Literal["skip", "error"] = "skip"

    @field_validator("root", "cache_dir", mode="before")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        return _not_empty_path(v)

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
        """Data loader processes: `num_workers`, or the default for this machine."""
        return default_num_workers() if self.num_workers is None else self.num_workers


# ---------------------------------------------------------------------------- the rest


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # `lr: .inf` is > 0, and trains on NaN


class PreprocessingConfig(_Section):
    """What the weights expect, for a weight file that does not say (a bare .pth, .safetensors)."""

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    crop_pct: float | None = Field(None, gt=0, le=1)
    interpolation: Literal["bilinear", "bicubic", "nearest", "area", "lanczos"] | None = None

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and min(v) <= 0:
            raise ValueError(f"std values must be > 0, got {list(v)}")
        return v

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class HeadConfig(_Section):
    """`model.head`: what sits on the pooled features of an embedding run (`task: embedding`)."""

    type: Literal["arcface", "cosface", "softmax"] = "arcface"
    """arcface or cosface: BatchNorm, a linear map to `dim` and L2 normalisation, trained with that
    margin loss (pytorch-metric-learning's); softmax: a plain classifier over the training people,
    whose pooled features, normalised, are the embedding (what a classifier recipe gives: the
    baseline the margin losses should beat)."""
    dim: int = Field(512, ge=2, le=4096)
    """The embedding's length (arcface, cosface)."""


class ModelConfig(_Section):
    arch: str = "efficientnet_b0"
    pretrained: str | bool | None = True
    """A hub id, a weight file, true (the default tag of `arch`) or false (random init)."""
    allow_random_init: bool = False
    """Only for offline demos: when the weights cannot be had, say so and start from random."""
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    """Overrides what the weights say (or the model's defaults, ImageNet mean/std, when they say
    nothing), e.g. mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5] for TensorFlow-trained Lite weights."""
    in_chans: Literal[1, 3] = 3
    num_classes: int | None = Field(None, ge=2)
    """Taken from the data; given here, it must agree with the data."""
    drop_rate: float | None = Field(None, ge=0, lt=1)
    drop_path_rate: float | None = Field(None, ge=0, lt=1)
    channels_last: bool = True
    """The channels_last memory format: faster convolutions on CPUs (oneDNN) and on GPU tensor
    cores; the results are the same numbers."""
    compile: bool = False
    sync_batchnorm: bool = False
    head: HeadConfig | None = None
    """Given, the run trains an embedding (`task: embedding`) instead of a classifier."""

    @model_validator(mode="before")
    @classmethod
    def _timm_spelling(cls, data: Any) -> Any:
        """timm's `arch: efficientnet_b0.ra_in1k` (or `hf_hub:timm/efficientnet_b0.ra_in1k`) is
        the model name and its weights: `arch: efficientnet_b0`, `pretrained: timm/efficientnet_b0.ra_in1k`."""
        if not isinstance(data, dict) or not isinstance(data.get("arch"), str):
            return data
        try:
            arch, tag = split_name(data["arch"])
        except UnknownModelError as exc:
            raise ValueError(f"arch: {exc}") from None
        if tag is None:
            return {**data, "arch": arch}
        if data.get("pretrained", True) is not True:
            raise ValueError(f"arch: {data['arch']!r} names its weights, and model.pretrained names others "
                             f"({data['pretrained']!r}): give the weights in one place")
        return {**data, "arch": arch, "pretrained": f"timm/{arch}.{tag}"}

    @field_validator("pretrained")
    @classmethod
    def _not_empty(cls, v: str | bool | None) -> str | bool | None:
        # an empty string is false to Python: it would train from random weights without a word
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty: give a hub id (timm/efficientnet_b0.ra_in1k), a weight file, true (the "
                             "default weights of model.arch) or false (random initialisation)")
        return v

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            get_variant(v)
        except UnknownModelError as exc:
            raise ValueError(str(exc)) from None
        return v


class FinetuneConfig(_Section):
    strategy: Literal["full", "linear_probe", "freeze_then_unfreeze", "gradual"] = "full"
    unfreeze_epoch: int = Field(1, ge=1)
    """freeze_then_unfreeze: the epoch (counted from 0) at which everything becomes trainable."""
    milestones: list[int] = Field(default_factory=lambda: [1, 2, 3])
    """gradual: at each of these epochs one more stage, from the top, becomes trainable."""
    train_bn: bool = False
    """Let frozen BatchNorm layers update their running statistics (their weights stay frozen)."""
    backbone_lr_scale: float = Field(1.0, gt=0, le=1)
    """Learning rate of the backbone relative to the head."""
    layer_decay: float | None = Field(None, gt=0, le=1)
    """Layer-wise decay: each stage below the head gets this factor more (overrides the scale)."""
    freeze_bottom: int = Field(0, ge=0, le=8)
    """Stages nearest the input kept frozen for the whole run, whatever the strategy (1: the
    stem, 3: the stem and the first two block stages). They hold generic edges and textures; left
    frozen, the backward pass stops above them, which saves much of a step's time at the
    high-resolution end of the network."""

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])) or any(m < 1 for m in v):
            raise ValueError(f"milestones must be increasing epochs >= 1, got {v}")
        return v


class OptimizerConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True


class SchedulerConfig(_Section):
    name: Literal["cosine", "onecycle", "step", "none"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)


class LossConfig(_Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: bool = False
    """Weight the cross-entropy by inverse class frequency of the train split."""
    pos_weight: bool = False
    """Multi-label (and binary BCE): weight positives by negatives / positives per label."""
    margin: float | None = Field(None, gt=0)
    """task: embedding -- the margin of model.head.type: arcface in degrees (default 28.6, i.e.
    0.5 rad, as the ArcFace paper), of cosface in cosine (default 0.35, as the CosFace paper)."""
    scale: float | None = Field(None, gt=0)
    """task: embedding -- the scale the margin losses multiply the cosines by (default 64)."""


class ThresholdConfig(_Section):
    method: Literal["youden", "sensitivity", "fixed"] = "youden"
    target: float | None = Field(None, gt=0, le=1)
    """method: sensitivity -- the sensitivity to reach on the validation set."""
    value: float = Field(0.5, gt=0, lt=1)
    """method: fixed -- the threshold."""

    @model_validator(mode="after")
    def _target_given(self) -> ThresholdConfig:
        if self.method == "sensitivity" and self.target is None:
            raise ValueError("method: sensitivity needs a target, e.g. target: 0.9")
        return self


class MetricsConfig(_Section):
    positive_class: str | None = None
    """Two-class data: the class sensitivity, specificity, PPV, the threshold, ROC and PR speak
    of (the finding). Unset: a class whose name says it (malignant, tumor, yes, abnormal, ...;
    see effft/data/positive.py), else label 1 of the data set. effft orders it second."""
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    tta: Literal["none", "flip"] = "none"
    """Test-time augmentation in validation and test: flip averages the logits of each image and
    its mirror (for data whose mirror image is the same class)."""
    calibration: Literal["temperature", "none"] = "temperature"
    """temperature: once trained, the logits are divided by the temperature that makes the val
    split's probabilities fit its frequencies best (for test, predictions, predict and export);
    none: the probabilities as the network gives them."""


class MonitorConfig(_Section):
    metric: str = "val/loss"
    mode: Literal["auto", "min", "max"] = "auto"
    early_stopping_patience: int | None = Field(None, ge=1)


class EmaConfig(_Section):
    enabled: bool = False
    decay: Annotated[float, Field(gt=0, lt=1)] | Literal["auto"] = "auto"
    """The weight the average keeps at each step; auto: planned from the run's length, so that
    the average spans about a tenth of its optimiser steps (a fixed 0.999 would span a thousand
    steps, more than a short fine-tuning run has)."""


class ReportConfig(_Section):
    baselines: list[Path] = Field(default_factory=list)
    """task: embedding -- other effft runs (run directories) whose embeddings are judged on this
    run's val and test people beside its own, e.g. the same recipe with model.head.type: softmax
    (a classifier's penultimate features). They must not have trained on those people. The
    pretrained weights' pooled features are always judged beside them."""
    error_grid: int = Field(8, ge=0, le=64)
    """How many of the most confident wrong test predictions report/errors.png shows, each with
    its Grad-CAM map (after `effft fit` and `effft test`); 0: no grid."""
    subgroups: list[str] = Field(default_factory=list)
    """Columns to break the test figures down by (each subgroup with intervals): columns of the
    CSV adapter's file, or for DICOM data PatientSex, age_band (from PatientAge), Manufacturer,
    InstitutionName."""


# Experiment trackers, each made as Lightning's own logger in runs/build.py: name -> (the module
# it needs, the extra that installs it), None where effft's own dependencies suffice.
LOGGERS: dict[str, tuple[str, str] | None] = {
    "csv": None, "tensorboard": None, "mlflow": ("mlflow", "track"), "wandb": ("wandb", "track"),
}


def _logger_name(v: str) -> str:
    if v not in LOGGERS:
        close = difflib.get_close_matches(v, list(LOGGERS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ValueError(f"unknown logger: {hint}the loggers are {', '.join(LOGGERS)}")
    return v


EMBEDDING_ADAPTERS = ("face", "folder")  # adapters whose class folders are people


class Recipe(_Section):
    name: str = Field(..., min_length=1, max_length=128)
    task: Literal["classification", "embedding"] | None = None
    """classification: a classifier over the classes of the data; embedding: a face (identity)
    embedding trained with a margin loss, evaluated on people never seen in training
    (verification, identification). Default: embedding where model.head is given."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seeds everything random in a run (the split too, unless data.split.seed says): 0 .. 2^32 - 1."""
    output_dir: Path = Path("runs")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    card: dict[str, str] = Field(default_factory=dict)
    """The model card of report.html, in the user's words: free text keys, all optional
    (intended_use, population, limitations, ...)."""
    loggers: list[Annotated[str, AfterValidator(_logger_name)]] = Field(
        default_factory=lambda: ["csv", "tensorboard"])
    """Experiment trackers, each writing under the run's logs/: csv, tensorboard, mlflow, wandb
    (mlflow and wandb need `pip install 'effft[track]'`); [] for none."""
    trainer: dict[str, Any] = Field(default_factory=lambda: {"max_epochs": 10})
    tune: dict[str, Any] | None = None
    """The search space of `effft tune` (config/space.py): recipe key paths, each with a range
    ({log_uniform: [low, high]}, {uniform: [...]}, {int: [...]}) or {choice: [...]}. `effft fit`
    does not read it."""

    @field_validator("tune")
    @classmethod
    def _space_entries(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("tune: is empty; name at least one key to search, or leave tune: out for the default space")
        for path, spec in v.items():
            check_entry(path, spec)
        return v

    @field_validator("output_dir", mode="before")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        return _not_empty_path(v)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("a run name is letters, digits, '.', '_' and '-' (it names a folder)")
        return v

    @field_validator("loggers", mode="before")
    @classmethod
    def _one_name(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # `--set loggers=mlflow`

    @field_validator("loggers")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        twice = sorted({name for name in v if v.count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once: give each logger once")
        return v

    @field_validator("trainer", mode="before")
    @classmethod
    def _trainer_args(cls, v: Any) -> dict[str, Any]:
        # names from Lightning's Trainer signature, types from its hints, ranges from config/trainer.py
        return trainer_args.check(v)

    @model_validator(mode="after")
    def _resolve_task(self) -> Recipe:
        """The task, the embedding head and the split's unit, each decided here once."""
        head = self.model.head
        if self.task == "classification" and head is not None:
            raise ValueError("model.head is for task: embedding: remove model.head, or set task: embedding")
        task = "embedding" if head is not None or self.task == "embedding" else "classification"
        self.task = task
        split = self.data.split
        if split.by is None:
            split.by = "identity" if task == "embedding" else "item"
        if task == "classification":
            if split.by == "identity":
                raise ValueError("data.split.by: identity keeps people out of training, which a classifier "
                                 "cannot name: it is for task: embedding; remove it or set task: embedding")
            given = [k for k in ("margin", "scale") if getattr(self.loss, k) is not None]
            if given:
                raise ValueError(f"loss.{given[0]} is for the margin losses of task: embedding: remove it")
            if self.report.baselines:
                raise ValueError("report.baselines are judged on the people of an embedding run: they are for "
                                 "task: embedding; remove them")
            return self
        if self.model.head is None:
            self.model.head = HeadConfig()
        if self.data.adapter not in EMBEDDING_ADAPTERS:
            raise ValueError(f"task: embedding learns people from a folder per person: use data.adapter face "
                             f"(or folder), not {self.data.adapter}")
        kind, margin = self.model.head.type, self.loss.margin
        if kind == "arcface" and margin is not None and margin >= 90:
            raise ValueError(f"loss.margin: {margin} degrees is too wide for arcface: give less than 90 "
                             "(the default is 28.6, i.e. 0.5 rad)")
        if kind == "cosface" and margin is not None and margin >= 1:
            raise ValueError(f"loss.margin: {margin} is too wide for cosface (a cosine margin): give less than 1 "
                             "(the default is 0.35)")
        if kind == "softmax" and (margin is not None or self.loss.scale is not None):
            raise ValueError("loss.margin and loss.scale are for model.head.type arcface or cosface, not softmax")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-able data (paths as strings)."""
        return self.model_dump(mode="json")
