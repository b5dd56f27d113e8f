"""`summary.md`: a run's model, weights and metric table per split, and where its files are."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..paths import atomic_write


def summary_md(
    *,
    recipe_name: str,
    model_name: str,
    weights: str,
    metrics_by_split: Mapping[str, Mapping[str, float]],
    threshold: float | None = None,
    files: Mapping[str, str | Path] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The text of `summary.md`: model, weights, the metric table per split, and the files.

    Per-class entries ("recall/<class>") are left to per_class.csv; the table holds the rest.
    `files` maps a description to a path (relative to the run folder); `notes` are lines a
    reader of the figures must see (how the splits were made), put above the table.
    """
    splits = list(metrics_by_split)
    names: list[str] = []
    for metrics in metrics_by_split.values():
        names += [n for n in metrics if "/" not in n and n not in names]
    lines = [f"# {recipe_name}", ""]
    lines += [f"> {note}\n" for note in notes]
    lines += [f"- model: `{model_name}`", f"- weights: {weights}"]
    if threshold is not None:
        lines.append(
            f"- decision threshold: {threshold:.4g} (a sample is positive when P(positive) >= "
            "threshold; chosen on val, applied unchanged to test)"
        )
    lines += ["", "| metric | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for name in names:
        cells = [_fmt(metrics_by_split[s].get(name)) for s in splits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if files:
        lines += ["", "## Files", ""]
        lines += [f"- {what}: `{Path(where).as_posix()}`" for what, where in files.items()]
    return "\n".join(lines) + "\n"


def write_summary(
    run_dir: Path,
    *,
    recipe_name: str,
    model_name: str,
    weights: str,
    metrics_by_split: Mapping[str, Mapping[str, float]],
    threshold: float | None = None,
    files: Mapping[str, str | Path] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write `run_dir/summary.md` (see `summary_md`); returns its path."""
    text = summary_md(
        recipe_name=recipe_name, model_name=model_name, weights=weights,
        metrics_by_split=metrics_by_split, threshold=threshold, files=files, notes=notes,
    )
    path = Path(run_dir) / "summary.md"
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "n/a" if math.isnan(value) else f"{value:.4f}"
