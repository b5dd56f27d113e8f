"""`effft explain`: Grad-CAM heat maps of a trained run, as PNG overlays, and a grid of its errors.

Grad-CAM (Selvaraju et al., 2017): for class c, the activations A (K x h x w) of a late layer are
weighted by the spatial mean of d(logit_c)/dA per channel; the map is the ReLU of that weighted
sum, upsampled (bilinear) to the input size and divided by its maximum (0..1; all zeros where
nothing speaks for the class).

The layer is the output of `bn2`, i.e. `forward_features`: the head conv after the last block
stage, at the same (last) resolution. It is the tensor the classifier sees after global pooling,
so the weights are exactly the classifier's row for c (divided by h*w) and the map shows what the
decision was made from; the last block stage's output would pass through one more 1x1 conv and
activation before the decision. The score is the logit (before softmax/sigmoid), as in the paper.

Which class: the one named (`class_name`), otherwise the predicted class (binary: by the run's
threshold). Multi-label runs get one map per label predicted present (probability at least 0.5,
as in `effft predict`), or of the top-scoring label where none is.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .console import console
from .errors import EffftError
from .paths import output_folder
from .predict import LoadedRun, find_images, load_run, probabilities

log = logging.getLogger(__name__)

ALPHA = 0.4  # weight of the heat map over the image
COLORMAP = "jet"


def gradcam(model: torch.nn.Module, x: Tensor, class_index: Tensor, *, layer: torch.nn.Module | None = None
            ) -> tuple[Tensor, Tensor]:
    """(maps (N, H, W) in 0..1 at the input size, logits (N, C)) for the class of each image.

    `class_index` (N,) names the class explained for each image; `layer` is the module whose
    output is used (default: the model's `bn2`, see the module docstring).
    """
    layer = layer if layer is not None else model.bn2
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(False)
            logits = model(x)
            act = captured[-1]
            scores = logits.gather(1, class_index.view(-1, 1).to(logits.device)).sum()
            # images are independent in eval mode, so one backward pass serves the whole batch
            (grads,) = torch.autograd.grad(scores, act)
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(dim=1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).clamp(0, 1).float(), logits.detach()


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
    from .train.metrics import predict as hard_predict

    on = hard_predict(probs, task="multilabel").bool()
    none = torch.nonzero(~on.any(dim=1)).flatten()
    on[none, probs[none].argmax(dim=1)] = True
    pairs = on.nonzero()  # row-major: the images in order, each one's labels by index
    return pairs[:, 0], pairs[:, 1]


def display_image(pipeline: Any, tensor: Tensor) -> np.ndarray:
    """A pipeline tensor (C, H, W) back to an HxWx3 float image in 0..1, for showing only."""
    import albumentations as A

    norm = next((t for t in pipeline.transforms if isinstance(t, A.Normalize)), None)
    arr = tensor.detach().cpu().numpy().astype(np.float64)
    if norm is not None:
        scale = float(norm.max_pixel_value) / 255.0
        mean = np.broadcast_to(np.asarray(norm.mean, dtype=np.float64).reshape(-1), (arr.shape[0],))
        std = np.broadcast_to(np.asarray(norm.std, dtype=np.float64).reshape(-1), (arr.shape[0],))
        arr = (arr * std[:, None, None] + mean[:, None, None]) * scale
    img = arr[:3].transpose(1, 2, 0) if arr.shape[0] >= 3 else np.repeat(arr[:1].transpose(1, 2, 0), 3, axis=2)
    return np.clip(img, 0.0, 1.0)


def overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = ALPHA) -> np.ndarray:
    """The heat map in colour blended over an HxWx3 0..1 image (alpha: the map's weight)."""
    from matplotlib import colormaps

    heat = colormaps[COLORMAP](np.clip(cam, 0.0, 1.0))[..., :3]
    return (1.0 - alpha) * image + alpha * heat


@dataclass
class Explanation:
    """One image explained: the class, its probability, the map and the image it was made on."""

    path: Path
    class_index: int
    prob: float
    cam: np.ndarray  # (H, W) in 0..1, at the model's input size
    image: np.ndarray  # (H, W, 3) in 0..1: the eval-preprocessed image


def explain_paths(run: LoadedRun, paths: Sequence[Path], *, class_name: str | None = None, batch_size: int = 16,
                  progress: bool = True) -> tuple[list[Explanation], list[tuple[Path, str]]]:
    """Grad-CAM for each readable file; unreadable ones come back as (path, reason), never fatal."""
    from rich.progress import Progress

    from .data.decode import BadImageError
    from .data.transforms import apply

    if batch_size < 1:
        raise EffftError(f"--batch-size must be at least 1, got {batch_size}")
    fixed = class_index(run, class_name)
    pipeline = run.eval_pipeline()
    done: list[Explanation] = []
    bad: list[tuple[Path, str]] = []
    with Progress(console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("explaining", total=len(paths))
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start:start + batch_size])
            tensors, read = [], []
            for p in chunk:
                try:
                    tensors.append(apply(pipeline, run.read(p)[0], run.in_chans))
                    read.append(Path(p))
                except BadImageError as exc:
                    bad.append((Path(p), exc.reason))
            if tensors:
                done += _explain_batch(run, pipeline, torch.stack(tensors), read, fixed)
            bar.advance(task, len(chunk))
    if bad:
        shown = "; ".join(f"{p}: {r}" for p, r in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        log.warning("%d of %d files could not be read: %s", len(bad), len(paths), shown)
    return done, bad


def _explain_batch(run: LoadedRun, pipeline: Any, batch: Tensor, paths: list[Path],
                   fixed: int | None) -> list[Explanation]:
    with torch.no_grad():
        probs = probabilities(run.model(batch), run.task)
    if fixed is None:
        rows, index = predicted_index(run, probs)
    else:
        rows, index = torch.arange(len(batch)), torch.full((len(batch),), fixed, dtype=torch.long)
    return _explain_indexed(run, pipeline, batch[rows], [paths[i] for i in rows.tolist()], index, probs[rows])


def _explain_indexed(run: LoadedRun, pipeline: Any, batch: Tensor, paths: list[Path], index: Tensor,
                     probs: Tensor) -> list[Explanation]:
    cams, _ = gradcam(run.model, batch, index)
    return [Explanation(path=p, class_index=int(c), prob=float(probs[i, int(c)]), cam=cams[i].numpy(),
                        image=display_image(pipeline, batch[i]))
            for i, (p, c) in enumerate(zip(paths, index.tolist()))]


def _figure_cell(ax: Any, e: Explanation, caption: str, fontsize: int = 9) -> None:
    ax.imshow(overlay(e.image, e.cam))
    ax.set_title(caption, fontsize=fontsize)
    ax.set_axis_off()


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_overlay(run: LoadedRun, e: Explanation, path: Path) -> Path:
    """A PNG: the eval-preprocessed image beside it with the Grad-CAM map over it, titled class (p)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(e.image)
    left.set_title(e.path.name, fontsize=8)
    left.set_axis_off()
    _figure_cell(right, e, f"Grad-CAM: {run.classes[e.class_index]} (p={e.prob:.3f})")
    _save(fig, path)
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
    from .run import CHECKPOINTS

    ckpt = run.ckpt
    return (ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent) / "explain"


def explain(target: Path, paths: Sequence[str | os.PathLike[str]], *, class_name: str | None = None,
            out: Path | None = None, batch_size: int = 16, progress: bool = True) -> Path:
    """Grad-CAM overlays for every image under `paths` with the run at `target`; returns the folder.

    One PNG per readable image and class explained (`<stem>.<class>.p<prob>.png`; several for a
    multi-label image) and `explain.csv` with a row for each: file, class, probability, overlay
    and, for unreadable files, the error.
    """
    run = load_run(Path(target))
    class_index(run, class_name)  # an unknown name fails before any image is read
    files = find_images(paths)
    out = output_folder(Path(out) if out is not None else default_out(run), flag="--out")
    done, bad = explain_paths(run, files, class_name=class_name, batch_size=batch_size, progress=progress)
    taken: set[str] = set()
    rows = []
    for e in done:
        name = _overlay_name(e, run.classes, taken)
        write_overlay(run, e, out / name)
        rows.append([str(e.path), run.classes[e.class_index], f"{e.prob:.6f}", name, ""])
    rows += [[str(p), "", "", "", reason] for p, reason in bad]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "explain.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "prob", "overlay", "error"])
        writer.writerows(rows)
    console.print(f"explained {len(done)} of {len(files)} images with {run.ckpt} -> {out}", highlight=False, markup=False)
    return out


# --- the grid of the most confident errors, for a run's report ---------------------------------


@dataclass
class _Error:
    path: Path
    true: str
    predicted: str
    explained: int  # the class whose map is drawn
    prob: float  # its probability in the CSV
    confidence: float  # in the wrong decision: the order of the grid


def _read_errors(run: LoadedRun, csv_path: Path) -> list[_Error]:
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise EffftError(f"cannot read {csv_path}: {exc.strerror or exc}") from None
    wanted = ["path", "target", "predicted"] + [f"prob_{c}" for c in run.classes]
    missing = [c for c in wanted if rows and c not in rows[0]]
    if missing:
        raise EffftError(f"{csv_path} lacks the column(s) {', '.join(missing)}: give a report/predictions.csv "
                         "of this run written with image paths")
    errors = []
    for row in rows:
        if row["target"] == row["predicted"]:
            continue
        p = np.array([float(row[f"prob_{c}"]) for c in run.classes])
        if run.task == "multilabel":
            truth = set(filter(None, row["target"].split(";")))
            said = set(filter(None, row["predicted"].split(";")))
            if truth == said:
                continue
            # the label decided most confidently the wrong way: p for a false positive, 1 - p for a miss
            wrong = [(p[i] if c in said else 1 - p[i], i) for i, c in enumerate(run.classes) if (c in said) != (c in truth)]
            confidence, explained = max(wrong)
        else:
            explained = run.classes.index(row["predicted"]) if row["predicted"] in run.classes else int(p.argmax())
            confidence = float(p[explained])
        errors.append(_Error(Path(row["path"]), row["target"], row["predicted"], explained, float(p[explained]),
                             float(confidence)))
    return errors


def error_grid(run: LoadedRun, predictions_csv: Path, out_png: Path, *, k: int = 8, batch_size: int = 16) -> Path | None:
    """A PNG grid of Grad-CAM overlays of the `k` most confident wrong predictions, or None.

    `predictions_csv` is a report's `predictions.csv` (path, target, predicted, prob_<class>, as
    `effft.train.report.write_report` writes it with paths). Each cell is captioned
    "true / predicted (p)", p the probability of the class drawn: the predicted class; for
    multilabel the label decided most confidently the wrong way (named in the caption). Unreadable files are skipped
    with a warning and the next error taken. Returns None (and says so) when nothing was wrong.
    """
    from matplotlib.figure import Figure

    from .data.decode import BadImageError
    from .data.transforms import apply

    if k < 1:
        raise EffftError(f"k must be at least 1, got {k}")
    errors = sorted(_read_errors(run, Path(predictions_csv)), key=lambda e: -e.confidence)
    if not errors:
        log.info("no wrong predictions in %s: no error grid written", predictions_csv)
        return None
    pipeline = run.eval_pipeline()
    chosen, tensors, bad = [], [], []
    for e in errors:
        if len(chosen) == k:
            break
        try:
            tensors.append(apply(pipeline, run.read(e.path)[0], run.in_chans))
            chosen.append(e)
        except BadImageError as exc:
            bad.append(f"{e.path}: {exc.reason}")
    if bad:
        log.warning("error grid: %d images could not be read and were skipped: %s", len(bad), "; ".join(bad[:10]))
    if not chosen:
        raise EffftError(f"none of the {len(errors)} wrongly predicted images in {predictions_csv} could be read")
    explained: list[Explanation] = []
    for s in range(0, len(chosen), batch_size):
        batch = torch.stack(tensors[s:s + batch_size])
        with torch.no_grad():
            probs = probabilities(run.model(batch), run.task)
        index = torch.tensor([e.explained for e in chosen[s:s + batch_size]])
        explained += _explain_indexed(run, pipeline, batch, [e.path for e in chosen[s:s + batch_size]], index, probs)
    ncols = min(4, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.9 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, err, e in zip(axes, chosen, explained):
        label = f"{run.classes[err.explained]} " if run.task == "multilabel" else ""
        _figure_cell(ax, e, f"{err.true or '-'} / {err.predicted or '-'} ({label}p={err.prob:.2f})", fontsize=8)
    for ax in axes[len(chosen):]:
        ax.set_axis_off()
    fig.suptitle(f"most confident errors: true / predicted (p), {len(chosen)} of {len(errors)}")
    _save(fig, Path(out_png))
    return Path(out_png)
