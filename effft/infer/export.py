"""`effft export`: a trained run as ONNX (fp32, or int8: `quantize.py`), a torch.export program
(.pt2) or TorchScript (deprecated upstream), with its preprocessing as JSON.

The exported network takes a (batch, channels, size, size) float tensor, already preprocessed
(resize, crop, normalise as the JSON says), at any batch size, and returns logits: apply
softmax (binary, multiclass) or sigmoid (multilabel) for probabilities. The spatial size is
fixed: models ported from TensorFlow pad by an amount computed from the input size, which the
export records for this one size.

The exported network has every BatchNorm folded into its convolution (`model/fuse.py`). Each
export is loaded back and compared with the run's own (unfolded) PyTorch model on random inputs
at batch sizes 1 and 3; it is written under a temporary name and renamed only once it agrees.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..console import console
from ..errors import EffftError
from ..model.weights.hub import first_line
from ..paths import atomic_write, output_file
from ..runs.layout import CHECKPOINTS, check_output, run_dir_of
from .loaded_run import LoadedRun, load_run

log = logging.getLogger(__name__)

Format = Literal["onnx", "onnx-int8", "pt2", "torchscript"]
FORMATS: dict[str, str] = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "pt2": ".pt2", "torchscript": ".pt"}
CHECK_BATCHES = (1, 3)
TOLERANCE = 1e-4
_EXTRA = "pip install 'effft[export]'"


class Embedding(torch.nn.Module):
    """An embedding run's network as exported: the L2-normalised embedding (a softmax head's: the
    pooled features), without the mirror-image averaging of `metrics.tta: flip`."""

    def __init__(self, model: torch.nn.Module, head: str) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..train.embedding import embed

        return embed(self.model, x, head=self.head)


class Calibrated(torch.nn.Module):
    """The network with its logits divided by the run's temperature, so that the exported file's
    softmax (or sigmoid) gives the calibrated probabilities `effft predict` gives."""

    def __init__(self, model: torch.nn.Module, temperature: torch.Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.ones(()) if temperature is None else temperature.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


@dataclass
class ExportResult:
    path: Path
    preprocessing_json: Path
    max_abs_diff: dict[int, float]  # batch size -> largest |export - PyTorch| of the logits (int8: of its fp32 source)
    int8: Any = None  # onnx-int8: the quantize.Int8Check measured on the test split


def default_out(run: LoadedRun, target: Path, fmt: Format) -> Path:
    """runs/<name>/export/model.<ext> for a run directory; runs/<name>/export/<stem>.<ext> for
    one of its checkpoints (checkpoints/ is the run's own); beside the file for another .ckpt."""
    suffix = FORMATS[fmt]
    if target.is_dir():
        return target / "export" / f"model{suffix}"
    if run.ckpt.parent.name == CHECKPOINTS:
        return run_dir_of(run.ckpt) / "export" / f"{run.ckpt.stem}{suffix}"
    return run.ckpt.with_suffix(suffix)


def preprocessing_json_path(out: Path) -> Path:
    return out.with_name(out.stem + ".preprocessing.json")


def preprocessing_info(run: LoadedRun) -> dict[str, Any]:
    """What a user of the exported file must do to an image, and what the outputs mean."""
    spec = run.spec
    resize = ("both sides to floor(input_size / crop_pct), ignoring the aspect ratio" if spec.crop_mode == "squash"
              else "shorter side to floor(input_size / crop_pct)")
    info: dict[str, Any] = {
        "model_name": getattr(run.model, "name", None),
        "input_size": spec.size,
        "input_shape": ["batch", spec.channels, spec.size, spec.size],
        "in_chans": spec.channels,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "crop_pct": spec.crop_pct,
        "crop_mode": spec.crop_mode,
        "interpolation": spec.interpolation,
        "resize": f"{resize}, then centre crop input_size; pixels scaled to 0..1, then (x - mean) / std",
        "custom_eval_transforms": run.eval_entries,
    }
    if run.is_embedding:
        info.update({
            "task": "embedding", "embedding_head": run.head,
            "output": "embedding, L2-normalised: the cosine similarity of two faces is the dot product of theirs",
            "thresholds": {**run.operating, "chosen_on": "val"},
            "verification": "the same person where the similarity is at or above thresholds.verification"})
    else:
        info.update({
            "classes": run.classes,
            "task": run.task,
            "threshold": run.threshold if run.task == "binary" else 0.5 if run.task == "multilabel" else None,
            "output": "logits" if run.temperature is None else "logits divided by the temperature (calibrated)",
            "temperature": None if run.temperature is None else run.temperature.tolist(),
            "activation": "sigmoid" if run.task == "multilabel" else "softmax",
        })
    if run.window is not None:  # DICOM pixels were windowed before anything else
        info["dicom_window"] = {"center": run.window.center, "width": run.window.width}
    if run.face is not None:  # the model saw face crops, not whole photos
        info["face_crop"] = {
            "detector": "largest face found by scikit-image's LBP frontal-face cascade",
            "margin": run.face.margin, "min_size": run.face.min_size,
            "crop": "the face box widened by margin x its size on each side, clamped to the image; "
                    "the whole image where no face is found",
        }
    return info


def _samples(run: LoadedRun) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    size = run.spec.size
    return {b: torch.randn(b, run.in_chans, size, size, generator=gen) for b in CHECK_BATCHES}


def _onnx_bytes(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The model as ONNX with a dynamic batch: torch's current exporter (`dynamo=True`, which
    needs onnxscript), or where it fails, the older TorchScript-based one, saying why."""
    import contextlib

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["input"],
                                        output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        buffer = io.BytesIO()
        program.save(buffer)  # type: ignore[union-attr]
        return buffer.getvalue()
    except Exception as exc:  # any failure of the new exporter: the older one is tried, loudly
        reason = "onnxscript is not installed" if isinstance(exc, ImportError) else first_line(exc)
        console.print(f"the current ONNX exporter failed ({reason}); using the older one", highlight=False,
                      markup=False)
    buffer = io.BytesIO()  # written by Python below, so a full disk is an error naming the file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes it records as constants
        torch.onnx.export(model, (example,), buffer, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return buffer.getvalue()


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, tmp: Path) -> Any:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise EffftError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): {_EXTRA}") from None
    data = _onnx_bytes(model, example)
    onnx.checker.check_model(onnx.load_from_string(data))
    tmp.write_bytes(data)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _export_pt2(model: torch.nn.Module, example: torch.Tensor, tmp: Path) -> Any:
    """torch.export's program (the successor of TorchScript), with a dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
    tmp.write_bytes(buffer.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.export.load(str(tmp))
    return loaded.module()


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, tmp: Path) -> Any:
    buffer = io.BytesIO()  # torch's own file writer aborts the process on a full disk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, buffer)
    tmp.write_bytes(buffer.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(tmp), map_location="cpu")
    loaded.eval()
    return loaded


def export(target: Path, *, fmt: Format, out: Path | None = None, tolerance: float = TOLERANCE,
           calibration: int | None = None) -> ExportResult:
    """Export the run at `target` (run directory or .ckpt); check it against PyTorch; write the JSON.
    onnx-int8: the fp32 ONNX model checked so, then quantised on `calibration` train images and
    measured against it on the test split (`quantize.py`)."""
    import tempfile

    from . import quantize

    if fmt not in FORMATS:
        raise EffftError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if calibration is not None and fmt != "onnx-int8":
        raise EffftError(f"--calibration-images is for --format onnx-int8, not --format {fmt}")
    calibration = quantize.DEFAULT_CALIBRATION if calibration is None else calibration
    if calibration < 1:
        raise EffftError(f"--calibration-images must be at least 1, got {calibration}")
    target = Path(target)
    run = load_run(target)
    out = Path(out) if out is not None else default_out(run, target, fmt)
    json_path = preprocessing_json_path(out)
    written = [out, json_path] + ([quantize.check_json_path(out)] if fmt == "onnx-int8" else [])
    example = default_out(run, target, fmt)
    for path in written:
        check_output(path, flag="--out", inputs=[run.ckpt], example=str(example), data_root=run.data_root)
    output_file(out, flag="--out", example=example.name)
    if fmt == "onnx-int8":
        run.refuse_embedding("--format onnx-int8 (which checks class predictions; use --format onnx)")
        data, seed = quantize.run_data(run)  # before anything is written: the data must be there
    from ..model.fuse import fuse_for_inference

    # the file holds the inference model (BatchNorm folded), checked against the run's own model
    if run.is_embedding:  # the embedding, not logits
        reference: torch.nn.Module = Embedding(run.model.float(), str(run.head)).eval()
        model: torch.nn.Module = Embedding(fuse_for_inference(run.model.float()), str(run.head)).eval()
    else:
        reference = Calibrated(run.model, run.temperature).float().eval()
        model = Calibrated(fuse_for_inference(run.model.float()), run.temperature).float().eval()
    samples = _samples(run)
    # an example batch of 2: a batch of 1 could let the trace treat the batch axis as special
    size = run.spec.size
    example = torch.randn(2, run.in_chans, size, size, generator=torch.Generator().manual_seed(1))
    int8 = None
    # kept only once the export agrees with PyTorch (int8: its fp32 source, in a scratch folder)
    with atomic_write(out) as tmp, tempfile.TemporaryDirectory(prefix="effft-export-") as scratch:
        if fmt == "torchscript":
            console.print("TorchScript is deprecated in PyTorch; --format pt2 (torch.export) is its successor",
                          highlight=False, markup=False)
        exported = Path(scratch) / "fp32.onnx" if fmt == "onnx-int8" else tmp
        writer = {"onnx": _export_onnx, "onnx-int8": _export_onnx, "pt2": _export_pt2,
                  "torchscript": _export_torchscript}[fmt]
        runner = writer(model, example, exported)
        what = "fp32 onnx" if fmt == "onnx-int8" else fmt
        diffs: dict[int, float] = {}
        with torch.no_grad():
            for batch, x in samples.items():
                got = runner(x)
                want = reference(x)
                if got.shape != want.shape:
                    raise EffftError(f"the {what} export of {run.ckpt} gave shape {tuple(got.shape)} at batch size "
                                     f"{batch}, PyTorch {tuple(want.shape)}; nothing was written")
                diffs[batch] = float((got.float() - want).abs().max())
        for batch, diff in diffs.items():
            console.print(f"{what} vs PyTorch, batch size {batch}: max abs difference {diff:.2e}", highlight=False, markup=False)
        worst = max(diffs.values())
        if not worst <= tolerance:  # NaN fails too
            raise EffftError(f"the {what} export of {run.ckpt} differs from PyTorch by {worst:.2e} "
                             f"(more than {tolerance:g}); nothing was written")
        if fmt == "onnx-int8":
            int8 = quantize.export_int8(run, exported, tmp, calibration=calibration, data=data, seed=seed)
            quantize.report(int8, out)
        with atomic_write(json_path) as json_tmp:
            json_tmp.write_text(json.dumps(preprocessing_info(run), indent=2) + "\n", encoding="utf-8")
    console.print(f"exported {run.ckpt} as {fmt}: {out} (preprocessing: {json_path})", highlight=False, markup=False)
    return ExportResult(path=out, preprocessing_json=json_path, max_abs_diff=diffs, int8=int8)
