"""Recipes: YAML in user words -> a validated `Recipe`.

Everything is checked before any work starts. A problem ends in one `RecipeError` that names
the key path (`data.augment.train[2].RandomResizedCrop.size`), the value, what is allowed and,
for a misspelt key, the closest valid one.
"""

from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.config import DataConfig
from .errors import RecipeError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    channels_last: bool = False
    compile: bool = False
    sync_batchnorm: bool = False

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        from .errors import UnknownModelError
        from .model.efficientnet import get_variant

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
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)


class MonitorConfig(_Section):
    metric: str = "val/loss"
    mode: Literal["auto", "min", "max"] = "auto"
    early_stopping_patience: int | None = Field(None, ge=1)


class EmaConfig(_Section):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)


# Trainer arguments effft sets itself, from other sections or the run directory.
_RESERVED_TRAINER_KEYS = {"callbacks", "logger", "default_root_dir", "enable_checkpointing",
                          "use_distributed_sampler", "enable_progress_bar", "sync_batchnorm"}


def _trainer_keys() -> list[str]:
    import lightning as L

    return [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]


class ReportConfig(_Section):
    error_grid: int = Field(8, ge=0, le=64)
    """How many of the most confident wrong test predictions report/errors.png shows, each with
    its Grad-CAM map (after `effft fit` and `effft test`); 0: no grid."""


class Recipe(_Section):
    name: str = Field(..., min_length=1)
    seed: int = 0
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
    trainer: dict[str, Any] = Field(default_factory=lambda: {"max_epochs": 10})

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"a run name is letters, digits, '.', '_' and '-' (it names a folder), got {v!r}")
        return v

    @field_validator("trainer")
    @classmethod
    def _trainer_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        allowed = _trainer_keys()
        for key in v:
            if key in _RESERVED_TRAINER_KEYS:
                raise ValueError(f"{key}: set by effft itself; remove it")
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"{key}: not an argument of Lightning's Trainer{hint}")
        return v

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-able data (paths as strings)."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------- loading


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-"):  # pydantic's names for validator steps
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the section at `loc` (for a close match to a misspelt key)."""
    model: Any = Recipe
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        model = next((a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")), None)
    return list(getattr(model, "model_fields", {}) or {})


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    where = _format_loc(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}? " if close else ""
        return f"{where}: unknown key. {hint}Allowed here: {', '.join(allowed)}"
    if loc == ("trainer",) and re.match(r"\w+: ", error["msg"].removeprefix("Value error, ")):
        key, _, msg = error["msg"].removeprefix("Value error, ").partition(": ")
        return f"trainer.{key}: {msg}"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    bad_arg = re.match(r"(\w+): bad argument '(\w+)'", msg)  # an augmentation's argument
    if bad_arg:
        where += f".{bad_arg[1]}.{bad_arg[2]}"
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    return f"{where}: {msg}{shown}"


def validate(raw: dict[str, Any], *, source: str = "recipe") -> Recipe:
    """A `Recipe` from plain data, or one RecipeError listing every problem."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections (name, model, data, ...), "
                          f"got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise RecipeError(f"{source} is not a valid recipe:\n  " + "\n  ".join(lines)) from None
    except RecipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a validator's own error type (UnknownModelError ...)
        if hasattr(exc, "exit_code"):
            raise RecipeError(f"{source}: {exc}") from None
        raise


def parse_override(text: str) -> tuple[list[str], Any]:
    """`key.path=value` -> (["key", "path"], value typed as YAML would type it)."""
    key, sep, value = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise RecipeError(f"--set {text!r}: expected key.path=value, e.g. --set data.batch_size=64")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _schema_type(path: list[str]) -> Any:
    """The annotation of the recipe field at `path` (None where the schema does not say)."""
    model: Any = Recipe
    annotation: Any = None
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        model = next((a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")),
                     annotation)
    return annotation


def _typed(path: list[str], text: str, parsed: Any) -> Any:
    """An override's value as the schema wants it: text stays text where the field is a string or a
    path (`--set name=2024`), and a number in e notation is a number (YAML 1.1 reads 1e-4 as text)."""
    annotation = _schema_type(path)
    options = set(getattr(annotation, "__args__", (annotation,)))
    if options & {str, Path} and not isinstance(parsed, tuple(t for t in options if isinstance(t, type))):
        return text
    if isinstance(parsed, str) and _FLOAT.fullmatch(parsed.strip()) and not options & {str, Path}:
        return float(parsed)
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `key.path=value` of `overrides` in `raw` (in place), typed by the schema."""
    for text in overrides:
        path, value = parse_override(text)
        value = _typed(path, text.partition("=")[2], value)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(path[:i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only, nothing executed) that refuses a key given twice in one
    mapping: PyYAML would keep the last silently, and a second `data:` section would replace the
    first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                hash(key)
            except TypeError:  # a list as a key: PyYAML's own check below names it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (also at line {seen[key].line + 1}): keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return raw if raw is not None else {}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`--set`) and validate a recipe file."""
    raw = read_yaml(Path(path))
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    recipe = validate(raw, source=str(path))
    check_paths(recipe, source=str(path))
    return recipe


def check_paths(recipe: Recipe, *, source: str) -> None:
    """Files the recipe names must exist before anything starts."""
    if not recipe.data.root.exists():
        raise RecipeError(f"{source}: data.root: {recipe.data.root} does not exist "
                          f"(paths are relative to the folder you run effft from: {Path.cwd()})")
    pretrained = recipe.model.pretrained
    if isinstance(pretrained, str) and Path(pretrained).suffix in {".safetensors", ".pth", ".pt", ".bin", ".ckpt"} \
            and not Path(pretrained).exists():
        raise RecipeError(f"{source}: model.pretrained: weight file {pretrained} does not exist")
