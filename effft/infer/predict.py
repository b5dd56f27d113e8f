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
import io
import logging
import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from ..console import console
from ..device import device_of
from ..errors import EffftError, Interrupted
from ..evaluate.metrics import probabilities
from ..model.fuse import fuse_for_inference
from ..model.weights.hub import first_line
from .loaded_run import LoadedRun, find_images, load_run
from .reading import Batch, check_batch_size, default_workers, read_batches

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
        return probabilities(torch.stack([run.logits(v).float() for v in views]).mean(0), run.task)
    return torch.stack([probabilities(run.logits(v), run.task) for v in views]).mean(0)


@dataclass
class Predictions:
    paths: list[Path]
    probs: Tensor  # (N, C); rows of files that could not be read are NaN
    errors: list[str | None]
    faces: list[bool | None] | None = None  # face runs: whether a face was found in each file


@dataclass
class _Tally:
    """What the warnings at the end say: the unreadable files (the first few named) and the
    photos without a face, counted as the batches pass."""

    files: int = 0
    read: int = 0
    bad: int = 0
    bad_shown: list[tuple[Path, str]] = field(default_factory=list)
    no_face: int = 0
    no_face_example: Path | None = None

    def add(self, batch: Batch, paths: Sequence[Path]) -> None:
        self.files += len(batch)
        self.read += len(batch.readable)
        for i, error, face in zip(batch.index, batch.errors, batch.faces):
            if error is not None:
                self.bad += 1
                if len(self.bad_shown) < 10:
                    self.bad_shown.append((paths[i], error))
            if face is False:
                self.no_face += 1
                self.no_face_example = self.no_face_example or paths[i]

    def warn(self, run: LoadedRun) -> None:
        if self.bad:
            shown = "; ".join(f"{p}: {e}" for p, e in self.bad_shown)
            more = f"; and {self.bad - len(self.bad_shown)} more" if self.bad > len(self.bad_shown) else ""
            log.warning("%d of %d files could not be read (listed in the error column): %s%s", self.bad, self.files,
                        shown, more)
        if run.face is not None and self.no_face:
            log.warning("no face found in %d of %d images: predicted on the whole image (face column 'no'), "
                        "e.g. %s", self.no_face, self.files, self.no_face_example)


def prediction_batches(run: LoadedRun, paths: Sequence[Path], *, tta: Tta = "none", batch_size: int = 32,
                       workers: int | None = None, precision: str = "fp32", progress: bool = True,
                       tally: _Tally | None = None) -> Iterator[tuple[Batch, Tensor]]:
    """(batch, its probabilities (len(batch), C) on the CPU, NaN for unreadable files), batch by
    batch in the order of `paths`. Files are read by `workers` loader processes (None: see
    `reading.default_workers`), started here, while the model runs where its weights are;
    `precision` bf16 runs it under autocast (checked by the caller: `device.check_precision`).
    The arguments are checked here, before any batch is asked for."""
    if tta not in TTA_MODES:
        raise EffftError(f"--tta {tta!r}: choose one of {', '.join(TTA_MODES)}")
    check_batch_size(batch_size)
    if precision not in ("fp32", "bf16"):
        raise EffftError(f"--precision {precision!r}: choose fp32 or bf16")
    if tta == "multicrop" and run.eval_entries is not None:
        log.warning("--tta multicrop uses the default eval resize, not the recipe's data.augment.eval")
    pipeline = _multicrop_pipeline(run) if tta == "multicrop" else run.eval_pipeline()
    device = device_of(run.model)
    workers = default_workers(len(paths), batch_size) if workers is None else workers
    batches = read_batches(run, paths, pipeline, batch_size=batch_size, workers=workers,
                           pin_memory=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    return _predicted(run, batches, paths, tta=tta, device=device, autocast=autocast, progress=progress,
                      tally=tally)


def _predicted(run: LoadedRun, batches: Iterator[Batch], paths: Sequence[Path], *, tta: Tta, device: torch.device,
               autocast: Any, progress: bool, tally: _Tally | None) -> Iterator[tuple[Batch, Tensor]]:
    from rich.progress import Progress

    with Progress(console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("predicting", total=len(paths))
        for batch in batches:
            probs = torch.full((len(batch), len(run.classes)), float("nan"))
            if batch.readable:
                with autocast:
                    x = batch.images.to(device, non_blocking=True)  # from pinned memory on a GPU
                    probs[batch.readable] = predict_batch(run, x, tta=tta).cpu()
            if tally is not None:
                tally.add(batch, paths)
            yield batch, probs
            bar.advance(task, len(batch))


def predict_paths(run: LoadedRun, paths: Sequence[Path], *, tta: Tta = "none", batch_size: int = 32,
                  progress: bool = True, workers: int | None = None, precision: str = "fp32") -> Predictions:
    """Probabilities for each file, all kept in memory (for small calls; `predict` streams to a
    CSV instead); unreadable files get an error instead (never fatal)."""
    tally = _Tally()
    kept = list(prediction_batches(run, paths, tta=tta, batch_size=batch_size, workers=workers, precision=precision,
                                   progress=progress, tally=tally))
    tally.warn(run)
    return _collected(run, paths, kept)


def _collected(run: LoadedRun, paths: Sequence[Path], kept: list[tuple[Batch, Tensor]]) -> Predictions:
    """The Predictions of every batch kept, in order."""
    return Predictions(paths=list(paths), probs=torch.cat([p for _, p in kept]) if kept else
                       torch.zeros(0, len(run.classes)), errors=[e for b, _ in kept for e in b.errors],
                       faces=[f for b, _ in kept for f in b.faces] if run.face is not None else None)


def _header(run: LoadedRun, top_k: int) -> list[str]:
    k = max(1, min(top_k, len(run.classes)))
    if run.task == "binary":
        header = ["path", "label", f"prob_{run.classes[1]}"]
    elif run.task == "multilabel":
        header = ["path", "labels", "probs"]
    else:
        header = ["path"] + [f"{what}_{i}" for i in range(1, k + 1) for what in ("label", "prob")]
    return header + (["face"] if run.face is not None else []) + ["error"]


def _rows(run: LoadedRun, paths: Sequence[Path], probs: Tensor, errors: Sequence[str | None],
          faces: Sequence[bool | None], top_k: int) -> list[list[str]]:
    """The CSV rows (see `_header`) of files and their probabilities (N, C)."""
    from ..evaluate.metrics import predict as hard_predict

    k = max(1, min(top_k, len(run.classes)))
    width = len(_header(run, top_k))
    if run.task == "multiclass":
        top_p, top_i = (t.tolist() for t in probs.topk(k, dim=1))
    else:
        hard = hard_predict(probs, task=run.task, threshold=run.threshold if run.task == "binary" else None).tolist()
    rows = []
    for n, (path, error) in enumerate(zip(paths, errors)):
        face = [] if run.face is None else [{True: "yes", False: "no", None: ""}[faces[n]]]
        if error is not None:
            rows.append([str(path)] + [""] * (width - 2 - len(face)) + face + [error])
            continue
        if run.task == "binary":
            cells = [run.classes[hard[n]], f"{float(probs[n, 1]):.6f}"]
        elif run.task == "multilabel":
            p = probs[n].tolist()
            on = sorted((j for j, h in enumerate(hard[n]) if h), key=lambda j: -p[j])
            cells = [";".join(run.classes[j] for j in on), ";".join(f"{p[j]:.6f}" for j in on)]
        else:
            cells = [c for v, j in zip(top_p[n], top_i[n]) for c in (run.classes[j], f"{v:.6f}")]
        rows.append([str(path)] + cells + face + [""])
    return rows


def _csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


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


class CompiledModel(torch.nn.Module):
    """A model through torch.compile for one batch shape: a smaller batch (the last one, or one
    with unreadable files) is padded with zeros to `batch_size` and its rows cut back, so the
    model is compiled once, whatever the number of files."""

    def __init__(self, model: torch.nn.Module, batch_size: int) -> None:
        super().__init__()
        self.model, self.batch_size = model, batch_size
        self.compiled = torch.compile(model, dynamic=False)

    def forward(self, x: Tensor) -> Tensor:
        n = len(x)
        if n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        return self.compiled(x)[:n]


def compiled(run: LoadedRun, *, batch_size: int, precision: str) -> LoadedRun:
    """`run` with its model (folded, where it is to run) through torch.compile, compiled here on
    a batch of zeros of the eval pipeline's size: a compiler that fails says so before any file
    is read, and the first batch of files is not the one to wait for it."""
    import time

    model = CompiledModel(run.model, batch_size)
    device = device_of(run.model)
    x = torch.zeros(batch_size, run.in_chans, run.spec.size, run.spec.size, device=device)  # as the loader stacks them
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    started = time.perf_counter()
    # torch's note that it looked for CUDA's compiler on a machine without CUDA: not ours to act on
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), autocast:
            model(x)
    except Exception as exc:  # the compiler's own failure (no C++ compiler, an unsupported op): one line
        raise EffftError(f"--compile: torch.compile failed ({first_line(exc)}); predict without --compile") from None
    finally:
        quiet.setLevel(level)
    console.print(f"compiled the model for batches of {batch_size} in {time.perf_counter() - started:.0f} s",
                  highlight=False, markup=False)
    return replace(run, model=model)


def predict(target: Path, paths: Sequence[str | os.PathLike[str]], *, out: Path, top_k: int = 5,
            tta: Tta | None = None, batch_size: int = 32, progress: bool = True, engine: str = "torch",
            onnx: Path | None = None, workers: int | None = None, device: str = "auto", precision: str = "fp32",
            compile: bool = False, keep: bool = False) -> Predictions | None:
    """Predict every image under `paths` with the run at `target`; write the CSV `out`.

    `tta`: None for the run's own (its recipe's `metrics.tta`). `engine`: torch (the run's model,
    its BatchNorm folded, on `device`: auto, cpu, cuda or cuda:N, in `precision` fp32 or bf16) or
    onnxruntime (the run's ONNX export on the CPU: `onnx`, default <run>/export/model.onnx), with
    the same reading, preprocessing and CSV. `workers`: loader processes reading the files (None:
    up to 4, as the machine allows). `compile`: the torch engine's model through torch.compile,
    compiled once for `batch_size` (see `compiled`).

    The rows are written as each batch is predicted, in the order of the files, to
    `<out>.partial`, which is renamed to `out` once every file has its row. An interrupted or
    killed predict leaves no `out` (an earlier one stays as it was), and a partial file whose
    rows are complete up to the last batch written. Memory does not grow with the number of
    files beyond their list; `keep` also returns every probability (for small calls).
    """
    if engine not in ("torch", "onnxruntime"):
        raise EffftError(f"--engine {engine!r}: choose torch or onnxruntime")
    if top_k < 1:
        raise EffftError(f"--top-k must be at least 1, got {top_k}")
    if workers is not None and workers < 0:
        raise EffftError(f"--workers must be 0 (read in this process) or more, got {workers}")
    from ..device import DeviceError, check_precision, pick_device
    from ..paths import output_file
    from ..runs.layout import check_output, checkpoint_path

    where = pick_device(device)
    if engine == "onnxruntime" and (where.type != "cpu" or precision != "fp32"):
        if device != "auto" or precision != "fp32":
            raise DeviceError(f"--engine onnxruntime runs the export on the CPU in fp32: drop --device {device} "
                              f"and --precision {precision}, or use --engine torch")
        where = torch.device("cpu")
    if compile and engine != "torch":
        raise EffftError("--compile is for --engine torch: ONNX Runtime optimises the export itself; drop --compile")
    check_batch_size(batch_size)
    check_precision(precision, where)
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
        run = replace(run, model=fuse_for_inference(run.model).to(where))  # BatchNorm folded: the same outputs, sooner
        if compile:
            run = compiled(run, batch_size=batch_size, precision=precision)
    output_file(Path(out), flag="--out", example="predictions.csv")
    return stream_csv(run, files, out=Path(out), top_k=top_k, tta=run.tta if tta is None else tta,
                      batch_size=batch_size, workers=workers, precision=precision, progress=progress, keep=keep)


def stream_csv(run: LoadedRun, files: Sequence[Path], *, out: Path, top_k: int = 5, tta: Tta = "none",
               batch_size: int = 32, workers: int | None = None, precision: str = "fp32", progress: bool = True,
               keep: bool = False) -> Predictions | None:
    """The rows of `files` predicted by `run` (its model where it is to run, e.g. fused), written
    as each batch is predicted (see `predict`) to `out` through `<out>.partial`; `predict` after
    its checks and the loading of the run. `keep`: also return every probability."""
    from ..paths import growing_file, partial_path

    tally = _Tally()
    kept: list[tuple[Batch, Tensor]] = []
    batches = prediction_batches(run, files, tta=tta, batch_size=batch_size, workers=workers, precision=precision,
                                 progress=progress, tally=tally)
    written = 0
    try:
        with growing_file(out) as append:
            append(_csv_text([_header(run, top_k)]))
            for batch, probs in batches:
                names = [files[i] for i in batch.index]
                append(_csv_text(_rows(run, names, probs, batch.errors, batch.faces, top_k)))
                written += len(batch)
                if keep:
                    kept.append((batch, probs))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {out} was not written; the rows of the first {written} of {len(files)} "
                          f"files are in {partial_path(out)}", exit_code=130) from None
    tally.warn(run)
    console.print(f"predicted {tally.read} of {len(files)} images with {run.ckpt} -> {out}", highlight=False,
                  markup=False)
    return _collected(run, files, kept) if keep else None
