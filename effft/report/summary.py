"""`summary.md`: a run's model, weights and metric table per split, and where its files are."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    intervals: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    operating_points: Sequence[Mapping[str, Any]] = (),
    subgroups: Sequence[Mapping[str, Any]] = (),
    card: Mapping[str, str] | None = None,
    sections: Sequence[str] = (),
) -> str:
    """The text of `summary.md`: model, weights, the metric table per split, and the files.

    Per-class entries ("recall/<class>") are left to per_class.csv; the table holds the rest.
    `files` maps a description to a path (relative to the run folder); `notes` are lines a
    reader of the figures must see (how the splits were made), put above the table.
    `intervals` ({split: {metric: {"value", "low", "high", "method"}}}) puts each figure's 95%
    interval beside it, as "0.84 (0.75-0.91)"; `operating_points` adds their table, `subgroups`
    (rows of `evaluate.subgroups.subgroup_rows`) theirs, `card` the recipe's model card, and
    `sections` Markdown of the caller's (an embedding run's baselines) after the tables.
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
        cells = [_fmt(metrics_by_split[s].get(name), (intervals or {}).get(s, {}).get(name)) for s in splits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    methods = sorted({str(v["method"]) for by in (intervals or {}).values() for v in by.values()})
    if methods:
        lines += ["", "95% intervals in brackets: " + "; ".join(methods) + "."]
    if operating_points:
        lines += ["", "## Operating points", "",
                  "Each threshold was chosen on val and applied unchanged to the split reported; 95% Wilson "
                  "intervals in brackets.", "",
                  "| operating point | threshold | sensitivity | specificity | PPV | NPV | F1 | TP | FP | TN | FN |",
                  "|---" * 11 + "|"]
        for row in operating_points:
            figures = [_fmt(row[k], {"low": row[f"{k}_low"], "high": row[f"{k}_high"]})
                       for k in ("sensitivity", "specificity", "ppv", "npv")]
            lines.append(f"| {row['operating_point']} | {row['threshold']:.4g} | " + " | ".join(figures)
                         + f" | {_fmt(row['f1'])} | {row['tp']} | {row['fp']} | {row['tn']} | {row['fn']} |")
    if subgroups:
        lines += ["", "## Subgroups", "", "| column | subgroup | n | metric | value | flag |", "|---" * 6 + "|"]
        for row in subgroups:
            lines.append(f"| {row['column']} | {row['subgroup']} | {row['n']} | {row['metric']} | "
                         f"{_fmt(row['value'], row)} | {row['warning'] or ''} |")
    for section in sections:
        lines += ["", section.rstrip()]
    if card:
        lines += ["", "## Model card", ""]
        lines += [f"- {key.replace('_', ' ')}: {text}" for key, text in card.items()]
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
    intervals: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    operating_points: Sequence[Mapping[str, Any]] = (),
    subgroups: Sequence[Mapping[str, Any]] = (),
    card: Mapping[str, str] | None = None,
    sections: Sequence[str] = (),
) -> Path:
    """Write `run_dir/summary.md` (see `summary_md`); returns its path."""
    text = summary_md(
        recipe_name=recipe_name, model_name=model_name, weights=weights,
        metrics_by_split=metrics_by_split, threshold=threshold, files=files, notes=notes,
        intervals=intervals, operating_points=operating_points, subgroups=subgroups, card=card,
        sections=sections,
    )
    path = Path(run_dir) / "summary.md"
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _fmt(value: float | None, interval: Mapping[str, Any] | None = None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "n/a"
    low, high = (interval or {}).get("low"), (interval or {}).get("high")
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{value:.4f}"
    return f"{value:.4f} ({low:.3f}-{high:.3f})"
