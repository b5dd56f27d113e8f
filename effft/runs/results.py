"""What an evaluation leaves in a folder: metrics.json, report/ (with the error grid) and summary.md,
and the table printed at the end. Written by `effft fit` and `effft test` alike."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ..console import console
from ..errors import EffftError
from ..paths import atomic_write
from .build import Built
from .layout import CHECKPOINTS

log = logging.getLogger(__name__)


def _jsonable(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def write_results(out: Path, built: Built, results: dict[str, dict[str, float]], *, report_split: str = "test") -> None:
    """metrics.json, report/ (with errors.png) and summary.md in `out` (rank 0 only)."""
    from ..report.figures import write_report
    from ..report.summary import write_summary

    module, data = built.module, built.data
    with atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps({s: _jsonable(m) for s, m in results.items()}, indent=2))
    split = report_split if report_split in module.predictions else "val"
    preds = module.predictions.get(split)
    threshold = float(module.threshold) if module.task == "binary" else None
    if preds is not None and len(preds["targets"]):
        items = data.split_items(split)
        paths = [items[i].path for i in preds["index"].tolist()] if len(preds["index"]) == len(preds["targets"]) else None
        write_report(out / "report", task=module.task, classes=module.classes, probs=preds["probs"],
                     targets=preds["targets"], threshold=threshold, paths=paths, title=f"{built.recipe.name} ({split})")
    write_summary(out, recipe_name=built.recipe.name, model_name=built.recipe.model.arch, weights=built.weights,
                  metrics_by_split=results, threshold=threshold,
                  files={"checkpoints": CHECKPOINTS, "report": "report", "logs": "logs"}, notes=data.notes)
    _write_error_grid(out, built)


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


def show_results(results: dict[str, dict[str, float]], run_dir: Path, weights: str) -> None:
    from rich.table import Table

    split = "test" if results.get("test") else "val"
    table = Table(title=f"{split} metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in results[split].items():
        if "/" not in name:
            table.add_row(name, "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}")
    console.print(table)
    console.print(f"weights: {weights}", markup=False)
    console.print(f"run directory: {run_dir}", markup=False)
