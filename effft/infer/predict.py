"""`effft predict`: a trained run applied to image files and folders, results in a CSV.

The run is rebuilt from its checkpoint alone (see `loaded_run`): images are read as its data
adapter read them and prepared with its InputSpec and eval pipeline (the CSV's `face` column
says, for face runs, whether a face was found; where none was, the whole image is predicted).

Test-time augmentation (`tta`), probabilities averaged over the views of each image:
  - "none": the eval pipeline's image;
  - "flip": that image and its horizontal mirror;
  - "multicrop": the image resized as the eval pipeline does (shorter side to size / crop_pct)
    and centre-cropped to a square, then five crops of `size` from it (the centre and the four
    corners) and the mirror of the centre crop: six views. With crop_pct 1 all crops coincide.
    It always uses this default resize, also where the recipe gave its own eval transforms.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from ..console import console
from ..errors import EffftError
from ..evaluate.metrics import probabilities
from ..model.fuse import fuse_for_inference
from ..model.weights.hub import first_line
from ..paths import atomic_write
from .loaded_run import LoadedRun, find_images, load_run

log = logging.getLogger(__name__)

Tta = Literal["none", "flip", "multicrop"]
TTA_MODES: tuple[str, ...] = ("none", "flip", "multicrop")


def _multicrop_pipeline(run: LoadedRun) -> Any:
    import albumentations as A

    from ..data.transforms import build_pipeline, interpolation

    side = run.spec.resize
    steps = [{"SmallestMaxSize": {"max_size": side, "interpolation": interpolation(run.spec)}},
             {"CenterCrop": {"height": side, "width": side}}]
    pipeline = build_pipeline(train=False, entries=steps, spec=run.spec)
    assert isinstance(pipeline, A.Compose)
    return pipeline


def tta_views(batch: Tensor, *, tta: Tta, size: int) -> list[Tensor]:
    """The views of a batch whose probabilities are averaged (see the module docstring)."""
    if tta == "none":
        return [batch]
    if tta == "flip":
        return [batch, batch.flip(-1)]
    if tta == "multicrop":
        h, w = batch.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        centre = batch[..., top:top + size, left:left + size]
        corners = [batch[..., y:y + size, x:x + size] for y in (0, h - size) for x in (0, w - size)]
        return [centre, centre.flip(-1), *corners]
    raise EffftError(f"--tta {tta!r}: choose one of {', '.join(TTA_MODES)}")


@torch.no_grad()
def predict_batch(run: LoadedRun, batch: Tensor, *, tta: Tta = "none") -> Tensor:
    """Probabilities (N, C) for a batch of pipeline tensors, averaged over the TTA views (flip:
    of the mean logits of the two views, as the run's test with `metrics.tta: flip` made them)."""
    views = tta_views(batch, tta=tta, size=run.spec.size)
    if tta == "flip":
        return probabilities(torch.stack([run.logits(v) for v in views]).mean(0), run.task)
    return torch.stack([probabilities(run.logits(v), run.task) for v in views]).mean(0)


@dataclass
class Predictions:
    paths: list[Path]
    probs: Tensor  # (N, C); rows of files that could not be read are NaN
    errors: list[str | None]
    faces: list[bool | None] | None = None  # face runs: whether a face was found in each file


def predict_paths(run: LoadedRun, paths: Sequence[Path], *, tta: Tta = "none", batch_size: int = 32,
                  progress: bool = True) -> Predictions:
    """Probabilities for each file; unreadable files get an error instead (never fatal)."""
    from rich.progress import Progress

    from ..data.decode import BadImageError
    from ..data.transforms import apply

    if tta not in TTA_MODES:
        raise EffftError(f"--tta {tta!r}: choose one of {', '.join(TTA_MODES)}")
    if batch_size < 1:
        raise EffftError(f"--batch-size must be at least 1, got {batch_size}")
    if tta == "multicrop" and run.eval_entries is not None:
        log.warning("--tta multicrop uses the default eval resize, not the recipe's data.augment.eval")
    pipeline = _multicrop_pipeline(run) if tta == "multicrop" else run.eval_pipeline()
    probs = torch.full((len(paths), len(run.classes)), float("nan"))
    errors: list[str | None] = [None] * len(paths)
    faces: list[bool | None] = [None] * len(paths)
    with Progress(console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("predicting", total=len(paths))
        for start in range(0, len(paths), batch_size):
            tensors, rows = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    image, faces[i] = run.read(paths[i])
                except BadImageError as exc:
                    errors[i] = exc.reason
                    continue
                tensors.append(apply(pipeline, image, run.in_chans))
                rows.append(i)
            if tensors:
                probs[rows] = predict_batch(run, torch.stack(tensors), tta=tta)
            bar.advance(task, min(batch_size, len(paths) - start))
    bad = [(p, e) for p, e in zip(paths, errors) if e is not None]
    if bad:
        shown = "; ".join(f"{p}: {e}" for p, e in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        log.warning("%d of %d files could not be read (listed in the error column): %s", len(bad), len(paths), shown)
    if run.face is not None:
        missed = [p for p, f in zip(paths, faces) if f is False]
        if missed:
            log.warning("no face found in %d of %d images: predicted on the whole image (face column 'no'), "
                        "e.g. %s", len(missed), len(paths), missed[0])
    return Predictions(paths=list(paths), probs=probs, errors=errors,
                       faces=faces if run.face is not None else None)


def _rows(run: LoadedRun, preds: Predictions, top_k: int) -> tuple[list[str], list[list[str]]]:
    from ..evaluate.metrics import predict as hard_predict

    k = max(1, min(top_k, len(run.classes)))
    if run.task == "binary":
        header = ["path", "label", f"prob_{run.classes[1]}"]
    elif run.task == "multilabel":
        header = ["path", "labels", "probs"]
    else:
        header = ["path"] + [f"{what}_{i}" for i in range(1, k + 1) for what in ("label", "prob")]
    if preds.faces is not None:
        header.append("face")
    rows = []
    for i, path in enumerate(preds.paths):
        p = preds.probs[i]
        face = [] if preds.faces is None else [{True: "yes", False: "no", None: ""}[preds.faces[i]]]
        if preds.errors[i] is not None:
            rows.append([str(path)] + [""] * (len(header) - 1 - len(face)) + face + [preds.errors[i] or ""])
            continue
        if run.task == "binary":
            label = int(hard_predict(p[None], task="binary", threshold=run.threshold)[0])
            cells = [run.classes[label], f"{float(p[1]):.6f}"]
        elif run.task == "multilabel":
            on = hard_predict(p[None], task="multilabel")[0].nonzero().flatten().tolist()
            on.sort(key=lambda j: -float(p[j]))
            cells = [";".join(run.classes[j] for j in on), ";".join(f"{float(p[j]):.6f}" for j in on)]
        else:
            values, index = p.topk(k)
            cells = [c for v, j in zip(values.tolist(), index.tolist()) for c in (run.classes[j], f"{v:.6f}")]
        rows.append([str(path)] + cells + face + [""])
    return header + ["error"], rows


def write_csv(run: LoadedRun, preds: Predictions, out: Path, *, top_k: int = 5) -> Path:
    """The predictions as CSV, written to a temporary file and renamed (never half written)."""
    header, rows = _rows(run, preds, top_k)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return out


class OnnxModel(torch.nn.Module):
    """An exported ONNX file run by ONNX Runtime, called as the run's model would be. The file's
    logits are calibrated already (the export divides by the temperature)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise EffftError("--engine onnxruntime needs onnxruntime: pip install 'effft[export]'") from None
        if not path.is_file():
            raise EffftError(f"--engine onnxruntime: {path} does not exist; write it with effft export RUN "
                             "--format onnx, or give its place with --onnx FILE")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # whatever ONNX Runtime says: the file is not a model it runs
            raise EffftError(f"ONNX Runtime cannot load {path}: {first_line(exc)}; "
                             "export the run again with effft export RUN --format onnx") from None

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {"input": x.float().contiguous().numpy()})[0])


def predict(target: Path, paths: Sequence[str | os.PathLike[str]], *, out: Path, top_k: int = 5,
            tta: Tta | None = None, batch_size: int = 32, progress: bool = True, engine: str = "torch",
            onnx: Path | None = None) -> Predictions:
    """Predict every image under `paths` with the run at `target`; write the CSV `out`. `tta`:
    None for the run's own (its recipe's `metrics.tta`). `engine`: torch (the run's model, its
    BatchNorm folded) or onnxruntime (the run's ONNX export: `onnx`, default
    <run>/export/model.onnx), with the same reading, preprocessing and CSV."""
    if engine not in ("torch", "onnxruntime"):
        raise EffftError(f"--engine {engine!r}: choose torch or onnxruntime")
    if top_k < 1:
        raise EffftError(f"--top-k must be at least 1, got {top_k}")
    from ..paths import output_file
    from ..runs.layout import check_output, checkpoint_path

    files = find_images(paths)
    check_output(Path(out), flag="--out", inputs=[*files, checkpoint_path(Path(target))], example="predictions.csv")
    run = load_run(target)
    run.refuse_embedding("effft predict")
    check_output(Path(out), flag="--out", data_root=run.data_root, example="predictions.csv")
    if engine == "onnxruntime":
        from ..runs.layout import run_dir_of

        path = Path(onnx) if onnx is not None else run_dir_of(run.ckpt) / "export" / "model.onnx"
        run = replace(run, model=OnnxModel(path), temperature=None)  # the file's logits are calibrated
    else:
        run = replace(run, model=fuse_for_inference(run.model))  # BatchNorm folded: the same outputs, sooner
    output_file(Path(out), flag="--out", example="predictions.csv")
    preds = predict_paths(run, files, tta=run.tta if tta is None else tta, batch_size=batch_size, progress=progress)
    write_csv(run, preds, out, top_k=top_k)
    read = sum(e is None for e in preds.errors)
    console.print(f"predicted {read} of {len(files)} images with {run.ckpt} -> {out}", highlight=False, markup=False)
    return preds
