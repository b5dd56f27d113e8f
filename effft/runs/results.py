"""What an evaluation leaves in a folder: metrics.json, report/ (with the error grid) and summary.md,
and the table printed at the end. Written by `effft fit` and `effft test` alike."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..console import console
from ..errors import EffftError
from ..paths import atomic_write
from .build import Built
from .layout import CHECKPOINTS

log = logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """`value` with every NaN or infinity (also inside dicts and lists, and as numpy scalars) as
    None, which JSON can hold."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_results(out: Path, built: Built, results: dict[str, dict[str, float]], *, report_split: str = "test",
                  run_files: Path | None = None) -> dict[str, Any]:
    """metrics.json, report/ (with errors.png), summary.md and report.html in `out` (rank 0 only);
    `run_files`: the run directory where `out` is an evaluation of it (`effft test`). Returns
    what metrics.json holds."""
    from ..report.figures import write_report
    from ..report.summary import write_summary

    module, data = built.module, built.data
    split = report_split if report_split in module.predictions else "val"
    preds = module.predictions.get(split)
    threshold = float(module.threshold) if module.task == "binary" else None
    intervals, operating = _uncertainty(built, split) if split in results else ({}, [])
    groups = _subgroups(built, split, out / "report", overall=intervals) if split in results else []
    written: dict[str, Any] = dict(results)
    if intervals:
        written["intervals"] = {split: intervals}
    if operating:
        written["operating_points"] = {split: operating}
        write_rows(out / "report" / "operating_points.csv", operating)
    if groups:
        written["subgroups"] = {split: groups}
    written = jsonable(written)
    with atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(written, indent=2))
    if preds is not None and len(preds["targets"]):
        items = _predicted_items(built, split)
        paths = [it.path for it in items] if items is not None else None
        write_report(out / "report", task=module.task, classes=module.classes, probs=preds["probs"],
                     targets=preds["targets"], threshold=threshold, paths=paths, title=f"{built.recipe.name} ({split})",
                     operating=module.operating or None)
    write_summary(out, recipe_name=built.recipe.name, model_name=built.recipe.model.arch, weights=built.weights,
                  metrics_by_split=results, threshold=threshold, intervals={split: intervals} if intervals else None,
                  operating_points=operating, subgroups=groups, card=built.recipe.card,
                  files={"report, one page": "report.html", "checkpoints": CHECKPOINTS, "figures and tables": "report",
                         "logs": "logs"}, notes=data.notes)
    _write_error_grid(out, built)
    from ..report.html import write_html_report

    write_html_report(out, run_files=run_files or out)
    return written


def write_training_facts(run_dir: Path, *, weights: str, epochs: int, seconds: float,
                         image_sizes: dict[str, Any] | None = None) -> None:
    """report/training.json: the weights, the epochs trained, the wall time of the fit, the
    machine and the versions, and the sampled image sizes, for report.html."""
    import platform

    import lightning
    import torch

    from .. import __version__

    hardware = platform.processor() or platform.machine()
    hardware = f"{hardware}, {os.cpu_count()} CPU cores"
    if torch.cuda.is_available():
        hardware += ", " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    facts = {"weights": weights, "epochs": int(epochs), "seconds": round(float(seconds), 1), "hardware": hardware,
             "versions": {"effft": __version__, "torch": torch.__version__, "lightning": lightning.__version__,
                          "python": platform.python_version()},
             "image_sizes": image_sizes or {"sampled": 0}}
    (run_dir / "report").mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / "report" / "training.json") as tmp:
        tmp.write_text(json.dumps(facts, indent=2))


def _uncertainty(built: Built, split: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The split's figures with confidence intervals (`evaluate/intervals.py`; the bootstrap
    grouped by patient where the split has groups) and, for binary runs, its operating points
    at the thresholds chosen on val (`evaluate/operating_points.py`)."""
    from ..evaluate.intervals import split_intervals
    from ..evaluate.operating_points import operating_points

    module = built.module
    preds = module.predictions.get(split)
    if preds is None or not len(preds["targets"]) or module.task == "multilabel":
        return {}, []
    probs, y = preds["probs"].double().numpy(), preds["targets"].long().numpy()
    threshold = float(module.threshold) if module.task == "binary" else None
    intervals = split_intervals(module.task, probs, y, threshold=threshold, groups=_groups(built, split),
                                seed=built.recipe.seed)
    if module.task != "binary":
        return intervals, []
    thresholds = module.operating or {"run's threshold": threshold, "0.5": 0.5}
    return intervals, operating_points(probs[:, 1], y, thresholds)


def _predicted_items(built: Built, split: str) -> list[Any] | None:
    """The split's items in the order of its predictions (None where the order is unknown)."""
    preds = built.module.predictions[split]
    items = built.data.split_items(split)
    if len(preds["index"]) != len(preds["targets"]):
        return None
    return [items[i] for i in preds["index"].tolist()]


def _groups(built: Built, split: str) -> np.ndarray | None:
    """The patient (group) of each prediction, where the split has groups."""
    from ..evaluate.intervals import group_labels

    items = _predicted_items(built, split)
    return None if items is None else group_labels([it.group for it in items])


def _subgroups(built: Built, split: str, report_dir: Path, *, overall: dict[str, Any]) -> list[dict[str, Any]]:
    """report.subgroups: the split's figures per subgroup (`evaluate/subgroups.py`), written to
    report/subgroups.csv and drawn as a forest plot in report/subgroups.png."""
    from ..data.attributes import values
    from ..evaluate.subgroups import HEADLINE, subgroup_rows
    from ..report.figures import forest_plot

    module, wanted = built.module, built.recipe.report.subgroups
    preds = module.predictions.get(split)
    items = _predicted_items(built, split) if preds is not None else None
    if not wanted or items is None or not len(preds["targets"]) or module.task == "multilabel":
        return []
    columns = values(built.recipe.data, items, list(wanted))
    rows = subgroup_rows(module.task, preds["probs"].double().numpy(), preds["targets"].long().numpy(), columns,
                         threshold=float(module.threshold) if module.task == "binary" else None,
                         groups=_groups(built, split), seed=built.recipe.seed)
    flagged = sorted({f"{r['column']} = {r['subgroup']} ({r['warning']})" for r in rows if r["warning"]})
    if flagged:
        log.warning("subgroups whose figures say little: %s", "; ".join(flagged))
    write_rows(report_dir / "subgroups.csv", rows)
    forest_plot(report_dir / "subgroups.png", rows, task=module.task, overall=overall.get(HEADLINE[module.task]),
                title=f"{built.recipe.name} ({split})")
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """A CSV of `rows` (dicts with the same keys): report/operating_points.csv, subgroups.csv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_error_grid(out: Path, built: Built) -> None:
    """out/report/errors.png: Grad-CAM overlays of the most confident wrong test predictions of
    the module's model, as many as `report.error_grid` says, for images read from files (not
    from arrays inside one file, as MedMNIST's)."""
    from ..data.transforms import build_pipeline
    from ..report.errors import error_grid

    predictions, grid = out / "report" / "predictions.csv", out / "report" / "errors.png"
    grid.unlink(missing_ok=True)  # an earlier evaluation's grid is not this one's
    items = built.data.split_items("test")
    k = built.recipe.report.error_grid
    if not k or not predictions.exists() or not items or any("::" in it.path for it in items[:1]):
        return
    by_path = {Path(it.path): it for it in items}
    source, channels = built.data.source, built.spec.channels
    model = built.module.model.eval()
    try:  # images are read as the run's adapter read them (windowed, face-cropped)
        error_grid(model, classes=built.module.classes, task=built.module.task,
                   read=lambda path: source.read(by_path[Path(path)], channels),
                   pipeline=build_pipeline(train=False, entries=built.recipe.data.augment.eval, spec=built.spec),
                   channels=channels, predictions_csv=predictions, out_png=grid, k=k)
    except EffftError as exc:  # the run itself is complete; the grid is an extra
        log.warning("no error grid in the report: %s", exc)


def show_results(results: dict[str, dict[str, float]], run_dir: Path, weights: str,
                 intervals: dict[str, dict[str, Any]] | None = None) -> None:
    """The table printed at the end: the test figures (val where there is no test), with their
    intervals by split ({split: {metric: {"low", "high", ...}}}, as metrics.json holds them)."""
    from rich.table import Table

    split = "test" if results.get("test") else "val"
    intervals = (intervals or {}).get(split, {})
    table = Table(title=f"{split} metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if intervals:
        table.add_column("95% interval", justify="right")
    for name, value in results[split].items():
        if "/" not in name:
            row = [name, "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"]
            if intervals:
                ci = intervals.get(name) or {}
                row.append(f"{ci['low']:.3f}-{ci['high']:.3f}" if ci.get("low") is not None
                           and ci.get("high") is not None else "")
            table.add_row(*row)
    console.print(table)
    console.print(f"weights: {weights}", markup=False)
    console.print(f"run directory: {run_dir}", markup=False)
