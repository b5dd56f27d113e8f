"""`report.html`: one self-contained page about a finished run, for readers who will not open a
terminal (an ethics board, a clinical lead).

The page is built only from what the run directory already holds and reads the same from a USB
stick with no network: the figures are inline as base64 PNG data URIs, the style sheet sits in
a <style> element, and nothing points outside the file. Every piece of text taken from the run's
files is HTML-escaped. Its sections, in order:

- Data (`#data`): images per class and split, patients (groups) per split, skipped files and
  why, how the split was made, and a check that no patient is in two splits.
- Training (`#training`): architecture, initial weights, epochs, time, hardware, versions, and
  the resolved recipe as written.
- Results (`#results`): the test figures (val where there is no test) with 95% intervals, the
  per-class table, the operating points of a binary run, and the ROC, precision-recall,
  confusion and reliability figures.
- Subgroups (`#subgroups`), Errors (`#errors`, the Grad-CAM grid of the most confident wrong
  predictions), Model card (`#card`, the recipe's `card:` in the user's words) and a reporting
  checklist (`#checklist`) in the manner of CLAIM and TRIPOD+AI, saying what the run covers.

Any file but recipe.yaml and metrics.json may be missing; its part then says what is not
available. `write_cv_report` writes the matching page for a cross-validation folder, linking
each fold's own report.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..paths import atomic_write

__all__ = ["write_cv_report", "write_html_report"]

SPLITS = ("train", "val", "test")
SECTIONS = (("data", "Data"), ("training", "Training"), ("results", "Results"), ("subgroups", "Subgroups"),
            ("errors", "Errors"), ("card", "Model card"), ("checklist", "Reporting checklist"))
RESULT_FIGURES = (
    ("roc.png", "ROC curve: sensitivity against 1 - specificity over all thresholds."),
    ("pr.png", "Precision-recall curve: positive predictive value against sensitivity."),
    ("confusion_matrix.png", "Confusion matrix: true class in rows, predicted class in columns."),
    ("reliability.png", ("Reliability diagram: predicted probability against the observed rate; "
                         "a calibrated model follows the diagonal.")),
)
USUAL_CARD_KEYS = ("intended_use", "population", "limitations")
MAX_LISTED = 20

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 62rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { margin-bottom: .25rem; } h2 { border-bottom: 2px solid #ccc; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #bbb; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: .75rem; overflow-x: auto; white-space: pre-wrap; }
figure { margin: 1rem 0; } img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .9rem; color: #444; }
.summary { font-size: 1.05rem; } .missing { color: #666; font-style: italic; }
.warning { color: #8a3b00; } .card-text { white-space: pre-wrap; }
.covered { color: #17651a; font-weight: 600; } .partly { color: #8a6500; font-weight: 600; }
.not-covered { color: #a51515; font-weight: 600; }
@media print { body { max-width: none; } h2 { page-break-before: auto; } figure { page-break-inside: avoid; } }
"""


class _Raw(str):
    """HTML made here, put in a table cell as it is (every other cell is escaped)."""


@dataclass
class _Run:
    """What a run directory holds, read once; None where a file is missing or unreadable."""

    dir: Path
    recipe: dict[str, Any]
    recipe_text: str
    metrics: dict[str, Any]
    classes: list[str]
    task: str | None
    splits: list[dict[str, str]] | None
    bad_files: list[dict[str, str]] | None
    training: dict[str, Any] | None
    summary: str

    @property
    def report(self) -> Path:
        return self.dir / "report"

    @property
    def card(self) -> dict[str, str]:
        card = self.recipe.get("card")
        if not isinstance(card, Mapping):
            return {}
        return {str(k): "" if v is None else str(v) for k, v in card.items()}

    @property
    def result_split(self) -> str | None:
        """The split the results are of: test, else val, else None."""
        return next((s for s in ("test", "val") if self.metrics.get(s)), None)


# ---------------------------------------------------------------- public functions


def write_html_report(run_dir: Path, *, run_files: Path | None = None) -> Path:
    """Write `run_dir/report.html` (see the module's docstring) and return its path. `run_files`:
    where the run's recipe, splits, classes, skipped files and training facts are, when
    `run_dir` holds an evaluation only (`effft test` writes under runs/<name>/tests/)."""
    run = _load_run(Path(run_dir), Path(run_files) if run_files is not None else Path(run_dir))
    name = str(run.recipe.get("name") or run.dir.name)
    body = [f"<h1>{_esc(name)}</h1>", f'<p class="summary">{_headline(run)}</p>', _contents(SECTIONS)]
    body += [_data_section(run), _training_section(run), _results_section(run), _subgroups_section(run),
             _errors_section(run), _card_section(run), _checklist_section(run)]
    return _write_page(run.dir / "report.html", f"{name}: report", body)


def write_cv_report(cv_dir: Path) -> Path:
    """Write `cv_dir/report.html` for a cross-validation folder (fold-0/, fold-1/, ... and
    cv.json): the folds side by side, the pooled out-of-fold figures, the ensemble of folds
    against the best fold, the leakage check, and links to each fold's own report.html."""
    cv_dir = Path(cv_dir)
    cv = _read_json(cv_dir / "cv.json") or {}
    folds = _fold_metrics(cv_dir, cv)
    first = _read_yaml(cv_dir / "fold-0" / "recipe.yaml")[0] if (cv_dir / "fold-0").is_dir() else {}
    name = str(first.get("name") or cv_dir.name)
    sections = (("folds", "Folds"), ("pooled", "Pooled figures"), ("ensemble", "Ensemble of folds"),
                ("leakage", "Leakage check"))
    body = [f"<h1>{_esc(name)}: cross-validation</h1>",
            f'<p class="summary">{len(folds)} folds; each fold\'s own report is linked in the folds table.</p>',
            _contents(sections), _folds_section(folds), _pooled_section(cv), _ensemble_section(cv),
            _leakage_section(cv)]
    return _write_page(cv_dir / "report.html", f"{name}: cross-validation report", body)


# ---------------------------------------------------------------- reading the run


def _load_run(run_dir: Path, files: Path) -> _Run:
    recipe, recipe_text = _read_yaml(files / "recipe.yaml")
    classes_file = _read_json(files / "classes.json") or {}
    classes = classes_file.get("classes")
    task = classes_file.get("task")
    summary = run_dir / "summary.md"
    return _Run(
        dir=run_dir, recipe=recipe, recipe_text=recipe_text, metrics=_read_json(run_dir / "metrics.json") or {},
        classes=[str(c) for c in classes] if isinstance(classes, list) else [],
        task=str(task) if task else None,
        splits=_read_csv(files / "splits.csv"), bad_files=_read_csv(files / "bad_files.csv"),
        training=_read_json(files / "report" / "training.json"),
        summary=_read_text(summary) or "",
    )


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    text = _read_text(path)
    try:
        data = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    """The recipe as a mapping ({} where unreadable) and its text as written."""
    text = _read_text(path) or ""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    return (data if isinstance(data, dict) else {}), text


def _read_csv(path: Path) -> list[dict[str, str]] | None:
    text = _read_text(path)
    if text is None:
        return None
    return [{k: v or "" for k, v in row.items() if k is not None}
            for row in csv.DictReader(text.splitlines())]


def _get(mapping: Mapping[str, Any], dotted: str) -> Any:
    """mapping["a"]["b"] for "a.b"; None where any part is missing."""
    for key in dotted.split("."):
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _split_notes(summary: str) -> list[str]:
    """The "> " lines at the top of summary.md (how the split was made), before its first table
    or heading below the title."""
    notes = []
    for line in summary.splitlines()[1:]:
        if line.startswith(("|", "## ")):
            break
        if line.startswith("> "):
            notes.append(line[2:].strip())
    return notes


# ---------------------------------------------------------------- formatting


def _esc(value: object) -> str:
    return html.escape(str(value))


def _float(value: object) -> float | None:
    """A finite number from a JSON or CSV value; None for null, "", NaN or text."""
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _num(value: object, digits: int = 4) -> str:
    x = _float(value)
    return "n/a" if x is None else f"{x:.{digits}f}"


def _count(value: object) -> str:
    x = _float(value)
    return "n/a" if x is None else str(int(x))


def _interval(entry: Mapping[str, Any] | None) -> str:
    low, high = _float((entry or {}).get("low")), _float((entry or {}).get("high"))
    return "n/a" if low is None or high is None else f"{low:.3f}-{high:.3f}"


def _duration(seconds: object) -> str:
    s = _float(seconds)
    if s is None:
        return "n/a"
    hours, rest = divmod(round(s), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{s:.1f} s"


def _td(value: object) -> str:
    if isinstance(value, _Raw):
        return f"<td>{value}</td>"
    text = str(value)
    numeric = _float(text) is not None or text == "n/a"
    return f'<td class="num">{_esc(text)}</td>' if numeric else f"<td>{_esc(text)}</td>"


def _table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{h if isinstance(h, _Raw) else _esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _missing(text: str) -> str:
    return f'<p class="missing">{_esc(text)}</p>'


def _figure(path: Path, caption: str) -> str | None:
    """An inline <figure> of a PNG file; None where the file is missing or not a PNG."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(path.name)}: {_esc(caption)}</figcaption></figure>")


def _contents(sections: Sequence[tuple[str, str]]) -> str:
    items = "".join(f'<li><a href="#{sid}">{_esc(title)}</a></li>' for sid, title in sections)
    return f'<nav><p><strong>Contents</strong></p><ul>{items}</ul></nav>'


def _write_page(path: Path, title: str, body: Sequence[str]) -> Path:
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    with atomic_write(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------- top of the page


def _headline(run: _Run) -> str:
    task = f"{run.task.capitalize()} classification" if run.task else "Task not recorded"
    shown = ", ".join(run.classes[:10]) + (f" and {len(run.classes) - 10} more" if len(run.classes) > 10 else "")
    classes = f"{len(run.classes)} classes ({shown})" if run.classes else "classes not recorded"
    split = run.result_split
    metric = "accuracy" if run.task == "multiclass" else "auroc"
    value = _float(run.metrics.get(split, {}).get(metric)) if split else None
    if value is None:
        figure = "no headline figure is available."
    else:
        entry = _get(run.metrics, f"intervals.{split}.{metric}")
        where = f" (95% interval {_interval(entry)})" if _interval(entry) != "n/a" else ""
        label = "accuracy" if metric == "accuracy" else "AUROC"
        figure = f"{split} {label} {value:.4f}{where}."
    return _esc(f"{task}, {classes}; {figure}")


# ---------------------------------------------------------------- data


def _data_section(run: _Run) -> str:
    adapter, root = _get(run.recipe, "data.adapter"), _get(run.recipe, "data.root")
    source = (f"<p>Source: adapter <code>{_esc(adapter or 'not recorded')}</code>, "
              f"root <code>{_esc(root or 'not recorded')}</code>.</p>")
    parts = ['<h2 id="data">Data</h2>', source]
    parts += [f"<p><strong>Split note:</strong> {_esc(note)}</p>" for note in _split_notes(run.summary)]
    if run.splits is None:
        parts.append(_missing("splits.csv is not available: counts per class and split, patients per split "
                              "and the leakage check cannot be given."))
    else:
        parts += [_counts_table(run), _patients_line(run.splits), _leakage_line(run.splits)]
    parts.append(_bad_files_part(run.bad_files))
    return "\n".join(parts)


def _split_names(rows: Sequence[Mapping[str, str]]) -> list[str]:
    seen = {r.get("split", "") for r in rows}
    return [s for s in SPLITS if s in seen] + sorted(s for s in seen - set(SPLITS) if s) or list(SPLITS)


def _class_counts(run: _Run) -> tuple[list[str], dict[tuple[str, str], int]]:
    """The classes (classes.json's order, then any others seen) and {(class, split): images}."""
    counts: dict[tuple[str, str], int] = {}
    names = list(run.classes)
    for row in run.splits or []:
        label = row.get("label", "")
        labels = [x for x in label.split("|") if x] if run.task == "multilabel" else [label]
        for name in labels:
            if name not in names:
                names.append(name)
            key = (name, row.get("split", ""))
            counts[key] = counts.get(key, 0) + 1
    return names, counts


def _sizes(run: _Run) -> str:
    """The image sizes fit sampled (report/training.json), as a sentence."""
    sizes = (run.training or {}).get("image_sizes") or {}
    if not sizes.get("sampled"):
        return "Image sizes were not recorded."
    parts = []
    for side in ("width", "height"):
        s = sizes.get(side) or {}
        parts.append(f"{side} {_num(s.get('median'), 0)} px (from {s.get('min')} to {s.get('max')})")
    return f"Image sizes, over a sample of {sizes['sampled']}: median " + ", ".join(parts) + "."


def _counts_table(run: _Run) -> str:
    rows = run.splits or []
    splits = _split_names(rows)
    names, counts = _class_counts(run)
    body = [[name, *(counts.get((name, s), 0) for s in splits), sum(counts.get((name, s), 0) for s in splits)]
            for name in names]
    per_split = [sum(1 for r in rows if r.get("split") == s) for s in splits]
    body.append([_Raw("<strong>all images</strong>"), *per_split, len(rows)])
    files = len({r.get("path", "") for r in rows})
    note = "" if files == len(rows) else f" The {len(rows)} images come from {files} files (frames counted apart)."
    caption = ("<p>Images per class and split (a multi-label image counts once for each of its labels)."
               if run.task == "multilabel" else "<p>Images per class and split.")
    caption += " " + _esc(_sizes(run)) + _esc(note) + "</p>"
    return caption + "\n" + _table(["class", *splits, "total"], body)


def _groups_by_split(rows: Sequence[Mapping[str, str]]) -> dict[str, set[str]]:
    """{group: the splits it is in}, for rows with a group."""
    found: dict[str, set[str]] = {}
    for row in rows:
        group = row.get("group", "").strip()
        if group:
            found.setdefault(group, set()).add(row.get("split", ""))
    return found


def _patients_line(rows: Sequence[Mapping[str, str]]) -> str:
    groups = _groups_by_split(rows)
    if not groups:
        return "<p>No patient or group column was given: the split is by image (no groups given).</p>"
    counts = ", ".join(f"{s}: {sum(1 for g in groups.values() if s in g)}" for s in _split_names(rows))
    return f"<p>Distinct patients (groups) per split: {_esc(counts)}.</p>"


def _leaks(rows: Sequence[Mapping[str, str]]) -> dict[str, list[str]]:
    """{group: its splits} for the groups in more than one of train, val and test."""
    return {g: [s for s in SPLITS if s in splits] for g, splits in sorted(_groups_by_split(rows).items())
            if len(splits & set(SPLITS)) > 1}


def _leakage_line(rows: Sequence[Mapping[str, str]]) -> str:
    if not _groups_by_split(rows):
        return "<p><strong>Leakage check:</strong> not possible: the split is by image (no groups given).</p>"
    leaks = _leaks(rows)
    if not leaks:
        return "<p><strong>Leakage check:</strong> passed: no patient/group is in two splits.</p>"
    listed = "".join(f"<li>{_esc(g)} ({_esc(', '.join(s))})</li>" for g, s in list(leaks.items())[:MAX_LISTED])
    more = f"<p>and {len(leaks) - MAX_LISTED} more.</p>" if len(leaks) > MAX_LISTED else ""
    return (f'<p class="warning"><strong>Leakage check:</strong> failed: {len(leaks)} patient(s)/group(s) '
            f"are in more than one split:</p><ul>{listed}</ul>{more}")


def _bad_files_part(bad: list[dict[str, str]] | None) -> str:
    if bad is None:
        return _missing("Files skipped: not available (bad_files.csv is missing).")
    if not bad:
        return "<p>Files skipped: none.</p>"
    rows = [[b.get("path", ""), b.get("reason", "")] for b in bad[:MAX_LISTED]]
    more = f"<p>and {len(bad) - MAX_LISTED} more (see bad_files.csv).</p>" if len(bad) > MAX_LISTED else ""
    intro = f"<p>Files skipped: {len(bad)}, with the reason each was left out:</p>"
    return f"{intro}\n{_table(['file', 'reason'], rows)}{more}"


# ---------------------------------------------------------------- training


def _weights(run: _Run) -> str | None:
    """The initial weights, from training.json or else summary.md's "- weights:" line."""
    if run.training and run.training.get("weights"):
        return str(run.training["weights"])
    line = next((x for x in run.summary.splitlines() if x.startswith("- weights: ")), None)
    return line[len("- weights: "):].strip() if line else None


def _training_section(run: _Run) -> str:
    facts = run.training or {}
    versions = facts.get("versions")
    versions = "; ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, Mapping) else None
    rows = [["architecture", _get(run.recipe, "model.arch") or "not recorded"],
            ["initial weights", _weights(run) or "not recorded"],
            ["epochs trained", _count(facts["epochs"]) if "epochs" in facts else "not recorded"],
            ["training time", _duration(facts["seconds"]) if "seconds" in facts else "not recorded"],
            ["hardware", facts.get("hardware") or "not recorded"],
            ["versions", versions or "not recorded"]]
    facts_table = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    parts = ['<h2 id="training">Training</h2>', f"<table>{facts_table}</table>"]
    if run.training is None:
        parts.append(_missing("report/training.json is not available: epochs, time, hardware and versions "
                              "were not recorded."))
    parts.append("<p>The resolved recipe (recipe.yaml), as the run used it:</p>")
    parts.append(f"<pre>{_esc(run.recipe_text) if run.recipe_text else 'recipe.yaml is not available.'}</pre>")
    return "\n".join(parts)


# ---------------------------------------------------------------- results


def _results_section(run: _Run) -> str:
    parts = ['<h2 id="results">Results</h2>']
    split = run.result_split
    if split is None:
        parts.append(_missing("metrics.json holds no val or test figures."))
    else:
        if split == "val":
            parts.append('<p class="warning">There are no test figures: these are the validation figures, '
                         "which guided training and so flatter the model.</p>")
        parts += [_metric_table(run, split), _per_class_part(run, split), _operating_points_part(run, split)]
    absent = []
    for name, caption in RESULT_FIGURES:
        figure = _figure(run.report / name, caption)
        parts.append(figure or "")
        absent += [] if figure else [name]
    if absent:
        parts.append(_missing("Figures not available: " + ", ".join(absent) + "."))
    return "\n".join(p for p in parts if p)


def _metric_table(run: _Run, split: str) -> str:
    intervals = _get(run.metrics, f"intervals.{split}") or {}
    rows = []
    for name, value in run.metrics[split].items():
        if "/" in name:
            continue
        entry = intervals.get(name) if isinstance(intervals, Mapping) else None
        rows.append([name, _num(value), _interval(entry), (entry or {}).get("method", "")])
    return f"<p>Figures on the {_esc(split)} split (95% intervals where computed).</p>\n" + \
        _table(["metric", "value", "95% interval", "method"], rows)


def _per_class_part(run: _Run, split: str) -> str:
    rows = _read_csv(run.report / "per_class.csv")
    if rows:
        header = list(rows[0])
        return "<p>Per class (report/per_class.csv):</p>\n" + _table(header, [[r[h] for h in header] for r in rows])
    per_class = {n: v for n, v in run.metrics[split].items() if "/" in n}
    if not per_class:
        return ""
    names = list(dict.fromkeys(n.split("/", 1)[0] for n in per_class))
    classes = list(dict.fromkeys(n.split("/", 1)[1] for n in per_class))
    body = [[c, *(_num(per_class.get(f"{m}/{c}")) for m in names)] for c in classes]
    return "<p>Per class:</p>\n" + _table(["class", *names], body)


def _operating_points_part(run: _Run, split: str) -> str:
    rows = _get(run.metrics, f"operating_points.{split}")
    if run.task != "binary" or not rows:
        return ""
    keys = ("sensitivity", "specificity", "ppv", "npv")
    body = []
    for r in rows:
        cells = [f"{_num(r.get(k))} ({_interval({'low': r.get(f'{k}_low'), 'high': r.get(f'{k}_high')})})"
                 for k in keys]
        body.append([r.get("operating_point", ""), _num(r.get("threshold")), *cells, _num(r.get("f1")),
                     *(_count(r.get(k)) for k in ("tp", "fp", "tn", "fn"))])
    header = ["operating point", "threshold", "sensitivity", "specificity", "PPV", "NPV", "F1", "TP", "FP", "TN", "FN"]
    return ("<p>Operating points: each threshold was chosen on the validation split and applied unchanged "
            f"to the {_esc(split)} split; 95% intervals in brackets.</p>\n" + _table(header, body))


# ---------------------------------------------------------------- subgroups, errors, card


def _subgroups_section(run: _Run) -> str:
    configured = _get(run.recipe, "report.subgroups") or []
    rows = _read_csv(run.report / "subgroups.csv")
    figure = _figure(run.report / "subgroups.png", "Each subgroup's figure with its 95% interval (forest plot).")
    parts = ['<h2 id="subgroups">Subgroups</h2>']
    if not configured and rows is None and figure is None:
        parts.append("<p>No subgroups were configured (<code>report.subgroups</code> in the recipe is empty).</p>")
        return "\n".join(parts)
    if configured:
        parts.append(f"<p>Broken down by: {_esc(', '.join(str(c) for c in configured))}.</p>")
    if rows:
        body = [[r.get("column", ""), r.get("subgroup", ""), _count(r.get("n")), _count(r.get("positives")),
                 r.get("metric", ""), _num(r.get("value")), _interval(r), _Raw(_warning(r.get("warning", "")))]
                for r in rows]
        parts.append(_table(["column", "subgroup", "n", "positives", "metric", "value", "95% interval", "warning"],
                            body))
    else:
        parts.append(_missing("report/subgroups.csv is not available."))
    parts.append(figure or _missing("report/subgroups.png is not available."))
    return "\n".join(parts)


def _warning(text: str) -> str:
    return f'<span class="warning">{_esc(text)}</span>' if text else ""


def _errors_section(run: _Run) -> str:
    caption = ("The most confident wrong predictions on the test split, each with its Grad-CAM map: the warm "
               "areas are those that raised the score of the predicted class most. A map shows where the model "
               "looked, not why it was wrong.")
    figure = _figure(run.report / "errors.png", caption)
    if figure:
        return '<h2 id="errors">Errors</h2>\n' + figure
    if _get(run.recipe, "report.error_grid") == 0:
        why = "report/errors.png is not available: the recipe turned the grid off (report.error_grid: 0)."
    else:
        why = ("report/errors.png is not available: the run made no error grid (no wrong test predictions, "
               "images held inside one file, or the grid could not be drawn).")
    return '<h2 id="errors">Errors</h2>\n' + _missing(why)


def _label(key: str) -> str:
    words = key.replace("_", " ").replace("-", " ").strip()
    return words[:1].upper() + words[1:]


def _card_section(run: _Run) -> str:
    card = {k: v for k, v in run.card.items() if v.strip()}
    parts = ['<h2 id="card">Model card</h2>']
    if not card:
        usual = ", ".join(USUAL_CARD_KEYS)
        parts.append(f"<p>The recipe's <code>card:</code> section was empty: nothing was written about this model's "
                     f"use. The usual keys are {_esc(usual)}.</p>")
        return "\n".join(parts)
    for key, text in card.items():
        parts.append(f'<h3>{_esc(_label(key))}</h3>\n<p class="card-text">{_esc(text.strip())}</p>')
    return "\n".join(parts)


# ---------------------------------------------------------------- checklist


@dataclass
class _Item:
    key: str
    item: str
    status: str  # "covered", "partly" or "not covered"
    where: str  # a section id
    note: str


def _state(full: bool, some: bool = False) -> str:
    return "covered" if full else "partly" if some else "not covered"


def _checklist(run: _Run) -> list[_Item]:
    """The reporting items of CLAIM and TRIPOD+AI that a run can speak to, each with whether it does."""
    card = {k for k, v in run.card.items() if v.strip()}
    split, report = run.result_split, run.report
    adapter, root = bool(_get(run.recipe, "data.adapter")), bool(_get(run.recipe, "data.root"))
    skipped = run.bad_files is not None
    grouped = bool(run.splits and _groups_by_split(run.splits))
    leaks = _leaks(run.splits) if grouped and run.splits else {}
    arch, weights = bool(_get(run.recipe, "model.arch")), bool(_weights(run))
    recipe, facts = bool(run.recipe_text), run.training is not None
    intervals = bool(split and _get(run.metrics, f"intervals.{split}"))
    points = bool(split and _get(run.metrics, f"operating_points.{split}"))
    reliability, ece = (report / "reliability.png").exists(), _has_metric(run, "ece")
    binary = run.task == "binary"
    patients = ("no groups given: split by image" if not grouped else
                f"{len(leaks)} group(s) in two splits" if leaks else "no patient is in two splits")
    performance = ("test figures with intervals" if split == "test" and intervals else
                   f"{split} figures without intervals" if split else "no figures")
    threshold = ("thresholds chosen on val, applied unchanged to test" if binary else
                 f"not applicable to a {run.task or 'non-binary'} task: the most probable class is taken")
    return [
        _Item("source", "Data source and adapter", _state(adapter and root, adapter), "data",
              "adapter and root from the recipe"),
        _Item("eligibility", "Inclusion and exclusion", _state(skipped and "population" in card,
              skipped or "population" in card), "data",
              "files effft skipped, with reasons; who was eligible belongs in the card's population"),
        _Item("split", "Split method and leakage check", _state(run.splits is not None), "data",
              "counts per split from splits.csv, with the split notes"),
        _Item("patients", "Patient-level separation of the splits", _state(grouped and not leaks), "data", patients),
        _Item("reference", "Reference standard (labels)", _state(bool(card & {"reference_standard", "labels"}),
              True), "card", "labels as given by the data, not verified by effft"),
        _Item("model", "Model and initial weights", _state(arch and weights, arch), "training",
              "architecture and pretrained weights"),
        _Item("training", "Training details", _state(recipe and facts, recipe), "training",
              "the full recipe; epochs, time, hardware and versions"),
        _Item("performance", "Performance with 95% confidence intervals",
              _state(split == "test" and intervals, split is not None), "results", performance),
        _Item("threshold", "Operating point chosen on validation", _state(binary and points, binary), "results",
              threshold),
        _Item("calibration", "Calibration", _state(reliability and ece, reliability or ece), "results",
              "reliability diagram and expected calibration error"),
        _Item("subgroups", "Subgroup performance", _state((report / "subgroups.csv").exists(),
              bool(_get(run.recipe, "report.subgroups"))), "subgroups", "figures per subgroup, with intervals"),
        _Item("explainability", "Explainability (Grad-CAM)", _state((report / "errors.png").exists()), "errors",
              "Grad-CAM maps of the most confident errors"),
        _Item("intended_use", "Intended use", _state("intended_use" in card), "card", "the card's intended_use"),
        _Item("limitations", "Limitations", _state("limitations" in card), "card", "the card's limitations"),
    ]


def _has_metric(run: _Run, name: str) -> bool:
    split = run.result_split
    return bool(split) and _float(run.metrics[split].get(name)) is not None


def _checklist_section(run: _Run) -> str:
    rows = []
    for it in _checklist(run):
        css = it.status.replace(" ", "-")
        title = dict(SECTIONS)[it.where]
        rows.append(f'<tr data-item="{it.key}"><td>{_esc(it.item)}</td><td class="{css}">{it.status}</td>'
                    f'<td><a href="#{it.where}">{_esc(title)}</a></td><td>{_esc(it.note)}</td></tr>')
    return ('<h2 id="checklist">Reporting checklist</h2>\n'
            "<p>Items of the CLAIM and TRIPOD+AI reporting guidelines that this run can speak to, and whether "
            "this report covers them. Items about the study itself (ethics approval, the clinical question, "
            "the setting) are the authors' to report.</p>\n"
            "<table>\n<thead><tr><th>item</th><th>status</th><th>where</th><th>note</th></tr></thead>\n<tbody>\n"
            + "\n".join(rows) + "\n</tbody>\n</table>")


# ---------------------------------------------------------------- cross-validation


def _fold_metrics(cv_dir: Path, cv: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """{fold: {"val": {...}, "test": {...}}}, from cv.json, else from each fold's metrics.json."""
    folds: dict[int, dict[str, Any]] = {}
    for entry in cv.get("folds") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("fold"), int):
            folds[entry["fold"]] = {s: entry.get(s) or {} for s in ("val", "test")}
    for path in cv_dir.glob("fold-*"):
        k = path.name.removeprefix("fold-")
        if path.is_dir() and k.isdigit() and int(k) not in folds:
            metrics = _read_json(path / "metrics.json") or {}
            folds[int(k)] = {s: metrics.get(s) or {} for s in ("val", "test")}
    return dict(sorted(folds.items()))


def _folds_section(folds: Mapping[int, Mapping[str, Any]]) -> str:
    parts = ['<h2 id="folds">Folds</h2>']
    if not folds:
        return "\n".join([*parts, _missing("No folds were found (no fold-K folders, no folds in cv.json).")])
    names = [(s, n) for s in ("val", "test") for n in dict.fromkeys(
        n for f in folds.values() for n in f[s] if "/" not in n)]
    header = ["split", "metric", *(_Raw(f'<a href="fold-{k}/report.html">fold {k}</a>') for k in folds)]
    rows = [[s, n, *(_num(f[s].get(n)) for f in folds.values())] for s, n in names]
    parts.append("<p>Each fold's figures, one column per fold; the fold's name links to its own report.</p>")
    parts.append(_table(header, rows))
    links = ", ".join(f'<a href="fold-{k}/report.html">fold-{k}/report.html</a>' for k in folds)
    parts.append(f"<p>Fold reports: {links}.</p>")
    return "\n".join(parts)


def _interval_rows(figures: Mapping[str, Any]) -> list[list[object]]:
    return [[name, _num(e.get("value")), _interval(e), e.get("method", "")]
            for name, e in figures.items() if isinstance(e, Mapping) and "/" not in name]


def _pooled_section(cv: Mapping[str, Any]) -> str:
    parts = ['<h2 id="pooled">Pooled figures</h2>']
    pooled, spread = cv.get("out_of_fold") or {}, cv.get("mean_sd") or {}
    if pooled:
        parts.append("<p>Out-of-fold figures: every image scored by the fold that did not train on it, pooled.</p>")
        parts.append(_table(["metric", "value", "95% interval", "method"], _interval_rows(pooled)))
    else:
        parts.append(_missing("Out-of-fold figures are not available."))
    if spread:
        rows = [[n, f"{_num(e.get('mean'))} ± {_num(e.get('sd'))}"] for n, e in spread.items()
                if isinstance(e, Mapping) and "/" not in n]
        parts += ["<p>Mean ± standard deviation across folds:</p>", _table(["metric", "mean ± sd"], rows)]
    else:
        parts.append(_missing("The mean and spread across folds are not available."))
    return "\n".join(parts)


def _ensemble_section(cv: Mapping[str, Any]) -> str:
    parts = ['<h2 id="ensemble">Ensemble of folds</h2>']
    ensemble = cv.get("ensemble_test") or {}
    best = cv.get("best_fold") or {}
    best_figures = best.get("test") or {} if isinstance(best, Mapping) else {}
    if not ensemble and not best_figures:
        return "\n".join([*parts, _missing("Ensemble and best-fold test figures are not available.")])
    fold = best.get("fold") if isinstance(best, Mapping) else None
    best_name = f"best single fold ({fold})" if fold is not None else "best single fold"
    rows = []
    for name in dict.fromkeys([*ensemble, *best_figures]):
        if "/" in name:
            continue
        e, b = ensemble.get(name) or {}, best_figures.get(name) or {}
        rows.append([name, _num(e.get("value")), _interval(e), _num(b.get("value")), _interval(b)])
    parts.append("<p>Test figures of the folds' averaged predictions against the best single fold's.</p>")
    parts.append(_table(["metric", "ensemble", "95% interval", best_name, "95% interval"], rows))
    return "\n".join(parts)


def _leakage_section(cv: Mapping[str, Any]) -> str:
    head = '<h2 id="leakage">Leakage check</h2>'
    leakage = cv.get("leakage")
    if not isinstance(leakage, Mapping):
        return head + "\n" + _missing("The leakage check is not available (cv.json holds none).")
    problems = [str(p) for p in leakage.get("problems") or []]
    if leakage.get("ok") and not problems:
        return head + "\n<p>Passed: no patient/group is in two splits of any fold.</p>"
    if not problems:
        return head + '\n<p class="warning">Failed (cv.json gives no details).</p>'
    listed = "".join(f"<li>{_esc(p)}</li>" for p in problems[:MAX_LISTED])
    more = f"<p>and {len(problems) - MAX_LISTED} more.</p>" if len(problems) > MAX_LISTED else ""
    return f'{head}\n<p class="warning">Failed:</p><ul>{listed}</ul>{more}'
