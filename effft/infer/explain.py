"""`effft explain`: Grad-CAM heat maps of a trained run over images, as PNG overlays.

How the maps are made: `effft.report.gradcam`.

Which class: the one named (`class_name`), otherwise the predicted class (binary: by the run's
threshold). Multi-label runs get one map per label predicted present (probability at least 0.5,
as in `effft predict`), or of the top-scoring label where none is.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..console import console
from ..device import device_of
from ..errors import EffftError
from ..evaluate.metrics import probabilities
from ..paths import atomic_write, output_folder
from ..report.figures import save_figure
from ..report.gradcam import Explanation, explain_indexed, figure_cell
from ..runs.layout import check_output, run_dir_of
from .loaded_run import LoadedRun, find_images, load_run
from .reading import check_batch_size, default_workers, read_batches

log = logging.getLogger(__name__)


def class_index(run: LoadedRun, name: str | None) -> int | None:
    """The index of class `name` in the run (None for None); an unknown name is an EffftError."""
    if name is None:
        return None
    if name not in run.classes:
        raise EffftError(f"--class {name!r} is not a class of {run.ckpt}: choose one of {', '.join(run.classes)}")
    return run.classes.index(name)


def predicted_index(run: LoadedRun, probs: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, classes): which image (row of `probs`) is explained for which class by default.

    One pair per image: the predicted class (binary: by the run's threshold); multi-label: a pair
    for each label predicted present, or the top label where none is.
    """
    rows = torch.arange(len(probs))
    if run.task == "binary":
        return rows, (probs[:, 1] >= run.threshold).long()
    if run.task != "multilabel":
        return rows, probs.argmax(dim=1)
    from ..evaluate.metrics import predict as hard_predict

    on = hard_predict(probs, task="multilabel").bool()
    none = torch.nonzero(~on.any(dim=1)).flatten()
    on[none, probs[none].argmax(dim=1)] = True
    pairs = on.nonzero()  # row-major: the images in order, each one's labels by index
    return pairs[:, 0], pairs[:, 1]


def explain_paths(run: LoadedRun, paths: Sequence[Path], *, class_name: str | None = None, batch_size: int = 16,
                  progress: bool = True,
                  workers: int | None = None) -> tuple[list[Explanation], list[tuple[Path, str]]]:
    """Grad-CAM for each readable file; unreadable ones come back as (path, reason), never fatal.
    The files are read by `workers` loader processes (None: `reading.default_workers`); the model
    runs where its weights are."""
    from rich.progress import Progress

    check_batch_size(batch_size)
    fixed = class_index(run, class_name)
    pipeline = run.eval_pipeline()
    device = device_of(run.model)
    workers = default_workers(len(paths), batch_size) if workers is None else workers
    batches = read_batches(run, paths, pipeline, batch_size=batch_size, workers=workers,
                           pin_memory=device.type == "cuda")
    done: list[Explanation] = []
    bad: list[tuple[Path, str]] = []
    with Progress(console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("explaining", total=len(paths))
        for batch in batches:
            bad += [(Path(paths[i]), e) for i, e in zip(batch.index, batch.errors) if e is not None]
            if batch.readable:
                read = [Path(paths[batch.index[k]]) for k in batch.readable]
                done += _explain_batch(run, pipeline, batch.images.to(device, non_blocking=True), read, fixed)
            bar.advance(task, len(batch))
    if bad:
        shown = "; ".join(f"{p}: {r}" for p, r in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        log.warning("%d of %d files could not be read: %s", len(bad), len(paths), shown)
    return done, bad


def _explain_batch(run: LoadedRun, pipeline: Any, batch: Tensor, paths: list[Path],
                   fixed: int | None) -> list[Explanation]:
    with torch.no_grad():
        probs = probabilities(run.logits(batch), run.task).cpu()
    if fixed is None:
        rows, index = predicted_index(run, probs)
    else:
        rows, index = torch.arange(len(batch)), torch.full((len(batch),), fixed, dtype=torch.long)
    return explain_indexed(run.model, pipeline, batch[rows], [paths[i] for i in rows.tolist()], index, probs[rows])


def write_overlay(run: LoadedRun, e: Explanation, path: Path) -> Path:
    """A PNG: the eval-preprocessed image beside it with the Grad-CAM map over it, titled class (p)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(e.image)
    left.set_title(e.path.name, fontsize=8)
    left.set_axis_off()
    figure_cell(right, e, f"Grad-CAM: {run.classes[e.class_index]} (p={e.prob:.3f})")
    save_figure(fig, path)
    return path


def _overlay_name(e: Explanation, classes: list[str], taken: set[str]) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in classes[e.class_index])
    base = f"{e.path.stem}.{safe}.p{e.prob:.2f}"
    name, n = f"{base}.png", 1
    while name in taken:  # files of the same name in different folders
        n += 1
        name = f"{base}-{n}.png"
    taken.add(name)
    return name


def default_out(run: LoadedRun) -> Path:
    """`<run>/explain/` for a run directory's checkpoint, `explain/` beside another .ckpt."""
    return run_dir_of(run.ckpt) / "explain"


def explain(target: Path, paths: Sequence[str | os.PathLike[str]], *, class_name: str | None = None,
            out: Path | None = None, batch_size: int = 16, progress: bool = True, workers: int | None = None,
            device: str = "auto") -> Path:
    """Grad-CAM overlays for every image under `paths` with the run at `target`; returns the folder.

    One PNG per readable image and class explained (`<stem>.<class>.p<prob>.png`; several for a
    multi-label image) and `explain.csv` with a row for each: file, class, probability, overlay
    and, for unreadable files, the error. `device`: where the model runs (auto: a CUDA GPU where
    there is one, else the CPU).
    """
    from dataclasses import replace

    from ..device import pick_device

    where = pick_device(device)
    run = load_run(Path(target))
    run.refuse_embedding("effft explain")
    class_index(run, class_name)  # an unknown name fails before any image is read
    files = find_images(paths)
    out = Path(out) if out is not None else default_out(run)
    check_output(out, flag="--out", inputs=[*map(Path, paths), *files, run.ckpt], example=str(default_out(run)),
                 folder=True, data_root=run.data_root if run.walked else None)
    out = output_folder(out, flag="--out")
    run = replace(run, model=run.model.to(where))  # not folded: Grad-CAM needs the gradients of bn2's output
    done, bad = explain_paths(run, files, class_name=class_name, batch_size=batch_size, progress=progress,
                              workers=workers)
    taken: set[str] = set()
    rows = []
    for e in done:
        name = _overlay_name(e, run.classes, taken)
        write_overlay(run, e, out / name)
        rows.append([str(e.path), run.classes[e.class_index], f"{e.prob:.6f}", name, ""])
    rows += [[str(p), "", "", "", reason] for p, reason in bad]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "explain.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "prob", "overlay", "error"])
        writer.writerows(rows)
    console.print(f"explained {len(done)} of {len(files)} images with {run.ckpt} -> {out}", highlight=False, markup=False)
    return out


