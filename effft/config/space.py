"""The search space of `effft tune`: the recipe's `tune:` section, in the recipe's own words.

    tune:
      optimizer.lr: {log_uniform: [1.0e-4, 3.0e-3]}
      loss.label_smoothing: {uniform: [0.0, 0.2]}
      trainer.max_epochs: {int: [5, 15]}
      finetune.strategy: {choice: [full, freeze_then_unfreeze]}

Each key is a recipe key path (as `--set` takes them); each value names one kind of range.
The shape of an entry is checked with the recipe (`check_entry`); whether every value a range
allows is a valid value of its key is checked against the whole recipe (`search_space`): both
ends of a range and every choice are put into the recipe and the recipe validated, so the key's
own schema decides (an lr range reaching 0 is refused because `optimizer.lr` must be above 0);
that check is `config.load.search_space`, beside the recipe's other checks.

A recipe without `tune:` searches `default_space(recipe)`: the learning rate around the
recipe's own (a tenth of it to three times it), weight decay, label smoothing, dropout before
the classifier and the fine-tuning strategy. The ranges are those commonly searched when
fine-tuning an ImageNet model; none was fitted to a data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


KINDS = {
    "log_uniform": "[low, high]: a float between low and high (above 0), drawn evenly on a log scale",
    "uniform": "[low, high]: a float between low and high",
    "int": "[low, high]: a whole number from low to high",
    "choice": "[a, b, ...]: one of the values listed",
}
NOT_SEARCHED = ("name", "output_dir", "tune")  # what a trial is, not how it trains


@dataclass(frozen=True)
class Param:
    """One searched key: `path` (dotted), `kind` (a key of KINDS) and its `values` (the two ends
    of a range, or the choices)."""

    path: str
    kind: str
    values: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: list(self.values)}

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial draws for this key."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.path, list(self.values))
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(self.path, low, high)
        return trial.suggest_float(self.path, low, high, log=self.kind == "log_uniform")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_entry(path: Any, spec: Any) -> Param:
    """One `tune:` entry's shape (not yet its values against the recipe); raises ValueError."""
    if not isinstance(path, str) or not path or any(not part.isidentifier() for part in path.split(".")):
        raise ValueError(f"{path!r}: a key of tune: is a recipe key path such as optimizer.lr")
    if path.split(".")[0] in NOT_SEARCHED:
        raise ValueError(f"{path}: {path.split('.')[0]} says what the run is, not how it trains: it cannot be searched")
    kinds = "; ".join(f"{k}: {v}" for k, v in KINDS.items())
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ValueError(f"{path}: expected one of {kinds} (e.g. {path}: {{choice: [a, b]}})")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list):
        raise ValueError(f"{path}: {kind} takes a list, {KINDS[kind]}")
    if kind == "choice":
        if not values:
            raise ValueError(f"{path}: choice is empty; list at least one value")
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
            raise ValueError(f"{path}: choice values must be plain numbers, text, true/false or null, not lists or "
                             "mappings")
        if len({repr(v) for v in values}) != len(values):
            raise ValueError(f"{path}: choice lists a value twice")
        return Param(path, kind, tuple(values))
    if len(values) != 2 or not all(_number(v) for v in values):
        raise ValueError(f"{path}: {kind} takes {KINDS[kind]}; got {values!r}")
    low, high = values
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise ValueError(f"{path}: int takes two whole numbers; got {values!r}")
    if not low < high:
        raise ValueError(f"{path}: {kind} needs low < high; got {values!r}")
    if kind == "log_uniform" and low <= 0:
        raise ValueError(f"{path}: log_uniform needs low above 0; got {values!r}")
    return Param(path, kind, (float(low), float(high)) if kind != "int" else (low, high))


def default_space(recipe: Any) -> dict[str, dict[str, list[Any]]]:
    """The space searched when the recipe has no `tune:` section (see the module)."""
    lr = float(recipe.optimizer.lr)
    return {
        "optimizer.lr": {"log_uniform": [float(f"{lr / 10:.3g}"), float(f"{lr * 3:.3g}")]},
        "optimizer.weight_decay": {"log_uniform": [1e-4, 1e-1]},
        "loss.label_smoothing": {"uniform": [0.0, 0.2]},
        "model.drop_rate": {"uniform": [0.0, 0.5]},
        "finetune.strategy": {"choice": ["full", "freeze_then_unfreeze"]},
    }
