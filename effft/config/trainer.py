"""`trainer:` in a recipe: arguments of Lightning's Trainer, checked before anything is written.

The names, and the types a value may have, come from the Trainer's own signature and type
hints, less the types a recipe cannot hold (an `Accelerator` object, a `timedelta`). The ranges
are ours, for the arguments users set: where Lightning would take a value and fail later
(`accumulate_grad_batches: 0` divides by zero in the first step), or run and leave no
checkpoint (`max_epochs: 0`), the recipe is refused here, naming the key and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import re
import types
import typing
from typing import Any, Callable, Literal, Union, get_args, get_origin

from pydantic import ConfigDict, TypeAdapter, ValidationError

# effft's values for arguments a recipe leaves out (Lightning's own for the rest)
DEFAULTS: dict[str, Any] = {"max_epochs": 10, "num_sanity_val_steps": 0}

# Trainer arguments effft sets itself, and what to do instead
RESERVED = {
    "callbacks": "effft adds its own: checkpoints, the fine-tuning schedule, early stopping (monitor), EMA (ema)",
    "logger": "effft writes its logs into the run directory",
    "default_root_dir": "the run directory is output_dir/name",
    "enable_checkpointing": "every effft run keeps checkpoints/best.ckpt and last.ckpt",
    "use_distributed_sampler": "effft's data loaders share the data among processes themselves",
    "enable_progress_bar": "pass --quiet to hide the progress bar",
    "enable_model_summary": "pass --quiet to hide the model summary",
    "sync_batchnorm": "set model.sync_batchnorm instead",
    "plugins": "effft writes checkpoints with its own plugin, whole or not at all",
}

_NO_CHECKPOINT = "trains nothing, so no checkpoint would be made"


def keys() -> list[str]:
    """The Trainer's argument names."""
    import lightning as L

    return [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]


def _recipe_part(annotation: Any) -> Any:
    """The part of a Trainer annotation that plain YAML data can be: bool, int, float, str, null,
    literals, lists and mappings of those. None where nothing is left (a Python object only)."""
    origin = get_origin(annotation)
    if annotation is Any:
        return Any
    if origin in (Union, types.UnionType):
        kept = [p for p in map(_recipe_part, get_args(annotation)) if p is not None]
        return Union[tuple(kept)] if kept else None  # noqa: UP007 - built at run time
    if origin is Literal:
        return annotation
    if origin in (list, dict):
        return annotation if all(_recipe_part(a) is not None for a in get_args(annotation)) else None
    return annotation if annotation in (bool, int, float, str, type(None)) else None


@functools.cache
def _types() -> dict[str, Any]:
    import lightning as L

    hints = typing.get_type_hints(L.Trainer.__init__)
    return {key: _recipe_part(hints.get(key, Any)) for key in keys()}


def annotation(key: str) -> Any:
    """The types a recipe may give `trainer.<key>` (None for an unknown key or a Python object)."""
    return _types().get(key)


@functools.cache
def _adapter(key: str) -> TypeAdapter:
    # strict: `max_epochs: "10"`, `max_epochs: 2.5` or `deterministic: yes-please` are refused,
    # not converted; an int stays an int and a float a float (Lightning reads 1 and 1.0 apart)
    return TypeAdapter(_types()[key], config=ConfigDict(strict=True, allow_inf_nan=False))


_NOUNS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}


def _words(annotation: Any) -> str:
    """What a type allows, in words: 'a whole number, or null'."""
    literals = _literals(annotation)
    parts = ["one of " + ", ".join(map(repr, literals))] if literals else []
    for a in get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,):
        if get_origin(a) is list:
            parts.append("a list such as [0, 1]")
        elif get_origin(a) is dict:
            parts.append("a mapping such as {hours: 1}")
        elif get_origin(a) is not Literal:
            parts.append(_NOUNS.get(a, "anything"))
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", or " + parts[-1]


def _literals(annotation: Any) -> list[Any]:
    """Every value of the literals in `annotation` (a union of them)."""
    parts = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return [v for p in parts if get_origin(p) is Literal for v in get_args(p)]


# ---------------------------------------------------------------------------- ranges


def _duration(value: Any) -> bool:
    """A time Lightning's Timer reads: 'DD:HH:MM:SS' or timedelta keywords ({hours: 2}), above 0."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import Timer

    try:
        return Timer(duration=value).time_remaining() > 0  # Lightning's own parsing; nothing has run yet
    except (MisconfigurationException, TypeError, ValueError):
        return False


def _limit(*, zero: bool) -> Callable[[Any], bool]:
    """limit_*_batches: a fraction of the batches, or a whole number of them."""
    def ok(v: Any) -> bool:
        low_ok = v >= 0 if zero else v > 0
        return low_ok and (v <= 1 if isinstance(v, float) else True)
    return ok


def _val_check_interval(v: Any) -> bool:
    if isinstance(v, float):
        return 0 < v <= 1
    if isinstance(v, int):
        return v >= 1
    return _duration(v)


def _devices(v: Any) -> bool:
    if isinstance(v, int):
        return v == -1 or v >= 1
    if isinstance(v, list):
        return bool(v) and all(i >= 0 for i in v) and len(set(v)) == len(v)
    return bool(re.fullmatch(r"\s*(auto|-1|\d+|\d+(\s*,\s*\d+)*\s*,?)\s*", v))


def _accelerators() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})


def _strategies() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    return ["auto", *StrategyRegistry.available_strategies()]


def _clip_algorithms() -> list[str]:
    from lightning.pytorch.utilities import GradClipAlgorithmType

    return GradClipAlgorithmType.supported_types()


_DOUBLE = ("64", "64-true")  # the model turns float64, effft's batches stay float32: the first step fails
_PROFILERS = ("simple", "advanced", "pytorch", "xla")  # the names Lightning's Trainer takes (trainer/setup.py)

_DURATION = "a time 'DD:HH:MM:SS' such as '00:12:00:00' (quoted: YAML reads 12:00:00 as a number), or {hours: 12}"

# key: (is the value, already of the right type and not null, allowed?, what is allowed)
RULES: dict[str, tuple[Callable[[Any], bool], str | Callable[[], str]]] = {
    "max_epochs": (lambda v: v == -1 or v >= 1, f"a whole number >= 1, or -1 for no limit (0 {_NO_CHECKPOINT})"),
    "min_epochs": (lambda v: v >= 0, "a whole number >= 0"),
    "max_steps": (lambda v: v == -1 or v >= 1, f"a whole number >= 1, or -1 for no limit (0 {_NO_CHECKPOINT})"),
    "min_steps": (lambda v: v >= 0, "a whole number >= 0"),
    "max_time": (_duration, _DURATION),
    "accumulate_grad_batches": (lambda v: v >= 1, "a whole number >= 1: how many batches add up their gradients "
                                                  "before each optimiser step"),
    "log_every_n_steps": (lambda v: v >= 1, "a whole number >= 1"),
    "gradient_clip_val": (lambda v: v >= 0, "a number >= 0 (0 or null: no clipping)"),
    "gradient_clip_algorithm": (lambda v: v in _clip_algorithms(), lambda: " or ".join(map(repr, _clip_algorithms()))),
    "check_val_every_n_epoch": (lambda v: v >= 1, "a whole number >= 1, or null to validate every "
                                                  "val_check_interval batches across epochs"),
    "val_check_interval": (_val_check_interval, f"a fraction of the epoch in (0, 1] such as 0.5, a whole number of "
                                                f"batches >= 1, or {_DURATION}"),
    "limit_train_batches": (_limit(zero=False), f"a fraction in (0, 1] or a whole number of batches >= 1 "
                                                f"(0 {_NO_CHECKPOINT})"),
    "limit_val_batches": (_limit(zero=True), "a fraction in [0, 1] or a whole number of batches >= 0"),
    "limit_test_batches": (_limit(zero=False), "a fraction in (0, 1] or a whole number of batches >= 1 (effft "
                                               "evaluates the best checkpoint on the test split)"),
    "limit_predict_batches": (_limit(zero=True), "a fraction in [0, 1] or a whole number of batches >= 0"),
    "overfit_batches": (_limit(zero=True), "a fraction in [0, 1] or a whole number of batches >= 0"),
    "num_sanity_val_steps": (lambda v: v >= -1, "a whole number >= 0, or -1 for the whole validation set"),
    "reload_dataloaders_every_n_epochs": (lambda v: v >= 0, "a whole number >= 0"),
    "num_nodes": (lambda v: v >= 1, "a whole number >= 1"),
    "devices": (_devices, "a number of devices >= 1, -1 for all of them, a list of device indices such as [0, 1], "
                          "or 'auto'"),
    "precision": (lambda v: str(v) not in _DOUBLE, lambda: "one of " + ", ".join(
        repr(v) for v in _literals(annotation("precision")) if str(v) not in _DOUBLE) + ", or null (effft does not "
        "train in 64-bit precision)"),
    "profiler": (lambda v: v in _PROFILERS, "one of " + ", ".join(_PROFILERS)),
    "accelerator": (lambda v: v in _accelerators(), lambda: "one of " + ", ".join(_accelerators())),
    "strategy": (lambda v: v.lower() in _strategies(), lambda: "one of " + ", ".join(_strategies())),
    "fast_dev_run": (lambda v: not v, "false: fast_dev_run turns off the checkpoints and logs every effft run "
                                      "keeps; for a quick try set trainer.max_epochs: 1 and "
                                      "trainer.limit_train_batches: 2"),
    "barebones": (lambda v: not v, "false: barebones mode turns off the checkpoints and logs every effft run keeps"),
}


# effft's own key in the section: a time the whole run plans its epochs to fit (runs/budget.py)
BUDGET = "budget"
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?")


def seconds(value: Any) -> float | None:
    """A duration as a recipe writes it (90, 90s, 10m, 1h30m) in seconds; None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and value.strip():
        found = _DURATION.fullmatch(value.strip().lower())
        if found and any(found.groups()):
            h, m, s = (float(g) if g else 0.0 for g in found.groups())
            return 3600 * h + 60 * m + s
    return None


def _problem(key: str, value: Any) -> str | None:
    """Why `trainer.<key>: value` is refused, or None."""
    if key == BUDGET:
        given = seconds(value)
        if given is None or given < 10:
            return (f"expected a time for the whole run of at least 10 seconds, as 600, 90s, 10m or 1h30m "
                    f"(got {value!r})")
        return None
    if key in RESERVED:
        return f"set by effft itself ({RESERVED[key]}): remove it"
    if key not in _types():
        close = difflib.get_close_matches(key, keys(), n=1)
        return "not an argument of Lightning's Trainer" + (f" (did you mean {close[0]}?)" if close else "")
    kind = _types()[key]
    if kind is None or kind is type(None):
        return "takes a Python object, which a recipe cannot give: remove it"
    check, allowed = RULES.get(key, (None, None))
    allowed = allowed() if callable(allowed) else allowed
    try:
        _adapter(key).validate_python(value)
    except ValidationError:
        return f"expected {allowed or _words(kind)} (got {value!r})"
    if check is not None and value is not None and not check(value):
        return f"expected {allowed} (got {value!r})"
    return None


def _together(args: dict[str, Any]) -> list[str]:
    """Problems of arguments taken together (each one allowed alone)."""
    given = {**DEFAULTS, **args}
    max_epochs, every = given.get("max_epochs"), given.get("check_val_every_n_epoch", 1)
    out = []
    if isinstance(max_epochs, int) and max_epochs >= 1:
        if isinstance(given.get("min_epochs"), int) and given["min_epochs"] > max_epochs:
            out.append(f"min_epochs: {given['min_epochs']} is more than trainer.max_epochs: {max_epochs}")
        if isinstance(every, int) and every > max_epochs:
            out.append(f"check_val_every_n_epoch: {every} with max_epochs: {max_epochs} never validates, so no "
                       "checkpoint would be chosen: make it at most trainer.max_epochs")
    max_steps, min_steps = given.get("max_steps", -1), given.get("min_steps")
    if isinstance(min_steps, int) and isinstance(max_steps, int) and max_steps >= 1 and min_steps > max_steps:
        out.append(f"min_steps: {min_steps} is more than trainer.max_steps: {max_steps}")
    if "check_val_every_n_epoch" in args and every is None and not isinstance(given.get("val_check_interval"), int):
        out.append("check_val_every_n_epoch: null validates every trainer.val_check_interval batches, counted across "
                   "epochs: give trainer.val_check_interval as a whole number of batches")
    return out


def check(args: Any) -> dict[str, Any]:
    """The `trainer:` section, checked; a ValueError lists every problem, one `key: why` a line."""
    if not isinstance(args, dict):
        raise ValueError("expected a section of Lightning Trainer arguments, such as trainer: {max_epochs: 10}")
    problems = [f"{key}: {why}" for key, value in args.items() if (why := _problem(str(key), value))]
    if not problems:
        problems = _together(args)
    if problems:
        raise ValueError("\n".join(problems))
    # a literal given as another type Lightning reads apart (precision: 16.0) becomes the literal
    return {key: value if key == BUDGET else _adapter(key).validate_python(value) for key, value in args.items()}
