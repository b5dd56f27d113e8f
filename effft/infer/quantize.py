"""`effft export --format onnx-int8`: the run's ONNX model with int8 weights and activations, made
by ONNX Runtime's static quantiser and measured against the fp32 ONNX model before it is kept.

- Calibration: ONNX Runtime records the range of every activation over images of the run's train
  split (a seeded random `calibration` of them, 200 by default), read as the run read them and
  prepared by its eval pipeline. A file that cannot be read is skipped and named.
- Quantisation: QDQ format; weights int8 per output channel, activations uint8 per tensor over
  the calibration's minimum and maximum; after ONNX Runtime's own pre-processing (shape
  inference, graph optimisation). The BatchNorm is folded first, as in every export, and the
  fp32 model is checked against PyTorch as `--format onnx` is.
- Check, on the run's test split (its val split where it has no test images, and then it says
  so): both files predict every image. Printed and written to `<file>.check.json`: top-1
  agreement (binary: at the run's threshold; multi-label: every label the same), the accuracy of
  each, and the speed of each at batch 16 on the threads torch uses, alternating round by round
  with timm's eager fp32 forward of the same weights, as images/s and ratios against timm's.
  The split only measures: nothing is chosen on it.
- Agreement under 99% is said loudly: the int8 file is still written, the fp32 one is then the
  one to deploy. Where the train images span few pixel values (darkest to brightest), the
  warning says so: every activation then carries a small signal on a large offset, which 256
  levels cannot follow (a brain MRI set stored with values 0-2: agreement 0.62, and 0.92 after
  its contrast was stretched and the model trained again).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..console import console
from ..errors import EffftError
from ..paths import atomic_write
from .loaded_run import LoadedRun

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = 200
AGREEMENT_FLOOR = 0.99
SPEED_BATCH = 16
SPEED_ROUNDS = 5
CALIBRATION_BATCH = 10
CHECK_BATCH = 32
FAINT_RANGE = 32  # a median pixel range below this is named in the agreement warning


def check_json_path(out: Path) -> Path:
    return out.with_name(out.stem + ".check.json")


@dataclass
class Int8Check:
    split: str  # the split the figures come from (test; val where the run has no test images)
    images: int
    agreement: float  # the share of images where fp32 and int8 predict the same
    accuracy_fp32: float
    accuracy_int8: float
    images_per_s: dict[str, float]  # timm_eager_fp32, onnxruntime_fp32, onnxruntime_int8
    speedup_vs_timm: dict[str, float]  # onnxruntime_fp32, onnxruntime_int8: their images/s over timm's
    calibration_images: int
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable files: path, split, reason
    pixel_range: float = 255.0  # the calibration images' median of (brightest - darkest pixel value)
    threads: int = 1
    batch_size: int = SPEED_BATCH


def _item_name(item: Any) -> str:
    return item.path if item.frame is None else f"{item.path} (frame {item.frame})"


def run_data(run: LoadedRun) -> Any:
    """The run's data with the split it was trained with; no file is decoded yet."""
    from ..config.load import validate
    from ..data.dataset import load_data
    from ..runs.layout import load_checkpoint_meta, run_dir_of

    ckpt, meta = load_checkpoint_meta(run.ckpt)
    splits = run_dir_of(ckpt) / "splits.csv"
    if not splits.is_file():
        raise EffftError(f"--format onnx-int8 calibrates on the run's train split and checks on its test split, "
                         f"but {splits} is not there: give a run directory written by effft fit")
    recipe = validate(copy.deepcopy(meta["recipe"]), source=f"recipe in {ckpt}")
    if not Path(recipe.data.root).exists():
        raise EffftError(f"--format onnx-int8 reads the run's images, but its data.root {recipe.data.root} "
                         f"(recipe in {ckpt}) is not there: put the data back there, or use --format onnx")
    two = len(run.classes) == 2
    data = load_data(recipe.data, channels=run.in_chans, seed=recipe.seed, splits_file=splits, progress=False,
                     positive_class=run.classes[1] if two else None,
                     positive_key="the trained run's positive class", scan_files=False)
    if data.classes != run.classes:
        raise EffftError(f"the data at {recipe.data.root} now have classes {data.classes}, but the run at {ckpt} "
                         f"was trained on {run.classes}: --format onnx-int8 needs the run's own data")
    return data, recipe.seed


class SplitImages:
    """Items of one split, read as the run read them and prepared by its eval pipeline, in
    batches; files that cannot be read are skipped and kept in `skipped`."""

    def __init__(self, run: LoadedRun, data: Any, split: str, items: list[Any]) -> None:
        self.run, self.data, self.split, self.items = run, data, split, items
        self.pipeline = run.eval_pipeline()
        self.skipped: list[dict[str, str]] = []
        self.ranges: list[int] = []  # each image read: its brightest pixel value minus its darkest

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, list[Any]]]:
        from ..data.decode import BadImageError
        from ..data.transforms import apply

        tensors: list[torch.Tensor] = []
        targets: list[Any] = []
        for item in self.items:
            try:
                image = self.data.source.read(item, self.run.in_chans)
            except BadImageError as exc:
                self.skipped.append({"path": _item_name(item), "split": self.split, "reason": exc.reason})
                continue
            self.ranges.append(int(image.max()) - int(image.min()))
            tensors.append(apply(self.pipeline, image, self.run.in_chans))
            targets.append(item.target)
            if len(tensors) == size:
                yield torch.stack(tensors).numpy(), targets
                tensors, targets = [], []
        if tensors:
            yield torch.stack(tensors).numpy(), targets


def _calibration_reader(images: list[np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """The batches, served a range at a time: the calibrator then holds one range's
        activations, not every batch's."""

        def __init__(self) -> None:
            self.set_range(0, len(images))

        def __len__(self) -> int:
            return len(images)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.batches = iter(images[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    return Reader()


def quantize(fp32: Path, out: Path, calibration: list[np.ndarray], scratch: Path) -> None:
    """ONNX Runtime's static QDQ quantisation of `fp32` into `out`, calibrated on the batches."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = scratch / "prepared.onnx"
    quiet = logging.getLogger()  # the quantiser logs its advice at WARNING on the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(out), _calibration_reader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibStridedMinMax": 1})  # ranges merged batch by batch
    finally:
        quiet.setLevel(level)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # no spin-waiting between runs: it took the cores from timm's forward timed after it (15% slower
    # at 224 px); without it ONNX Runtime is the one a little handicapped, so its ratios err low
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _hard(run: LoadedRun, logits: np.ndarray) -> torch.Tensor:
    from ..evaluate.metrics import predict, probabilities

    return predict(probabilities(torch.from_numpy(logits), run.task), task=run.task,  # type: ignore[arg-type]
                   threshold=run.threshold if run.task != "multiclass" else None)


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: whether two hard predictions are equal (every label, for multi-label)."""
    return (a == b).reshape(len(a), -1).all(1)


def _speed(runners: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each runner after a warm-up, timed in alternation (`bench.rounds`)."""
    from ..bench.rounds import alternate

    for step in runners.values():
        step()  # warm-up
    return {k: statistics.median(v) for k, v in alternate(rounds, runners).items()}


def speed_batch(batches: list[np.ndarray]) -> np.ndarray:
    """The first SPEED_BATCH images of the batches; a smaller split's images repeated to make it up."""
    images = np.concatenate(batches)
    return np.concatenate([images] * (SPEED_BATCH // len(images) + 1))[:SPEED_BATCH]


def _timm_twin(run: LoadedRun) -> torch.nn.Module:
    """timm's own model of the run's architecture with the run's weights, eager and unfolded."""
    import timm

    model = run.model
    twin = timm.create_model(model.name, num_classes=len(run.classes), in_chans=run.in_chans)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def export_int8(run: LoadedRun, fp32: Path, tmp: Path, *, calibration: int = DEFAULT_CALIBRATION,
                data: Any, seed: int) -> Int8Check:
    """Quantise the checked fp32 ONNX file `fp32` into `tmp`; measure it on the test split."""
    train = data.split_items("train")
    if not train:
        raise EffftError(f"the run at {run.ckpt} has no train images to calibrate on")
    chosen = random.Random(seed).sample(train, min(calibration, len(train)))
    calib = SplitImages(run, data, "train", chosen)
    batches = [x for x, _ in calib.batches(CALIBRATION_BATCH)]
    if not batches:
        raise EffftError(f"none of the {len(chosen)} calibration images of the run at {run.ckpt} could be read "
                         f"(e.g. {calib.skipped[0]['path']}: {calib.skipped[0]['reason']})")
    used = sum(len(x) for x in batches)
    with tempfile.TemporaryDirectory(prefix="effft-int8-") as scratch:
        quantize(fp32, tmp, batches, Path(scratch))
    del batches
    threads = torch.get_num_threads()
    sessions = {"fp32": _session(fp32, threads), "int8": _session(tmp, threads)}
    split = "test" if data.split_items("test") else "val"
    checked = SplitImages(run, data, split, data.split_items(split))
    agree = right32 = right8 = n = 0
    firsts: list[np.ndarray] = []  # the split's first batches, for the speed batch
    for x, targets in checked.batches(CHECK_BATCH):
        out32 = _hard(run, sessions["fp32"].run(None, {"input": x})[0])
        out8 = _hard(run, sessions["int8"].run(None, {"input": x})[0])
        truth = torch.tensor(targets).reshape(out32.shape)
        agree += int(_same(out32, out8).sum())
        right32 += int(_same(out32, truth).sum())
        right8 += int(_same(out8, truth).sum())
        n += len(x)
        if sum(len(b) for b in firsts) < SPEED_BATCH:
            firsts.append(x)
    if n == 0:
        raise EffftError(f"the run at {run.ckpt} has no readable {split} images to check the int8 model on")
    sample = speed_batch(firsts)
    twin, x_torch = _timm_twin(run), torch.from_numpy(sample)

    def eager() -> None:
        with torch.no_grad():
            twin(x_torch)

    seconds = _speed({"timm_eager_fp32": eager,
                      "onnxruntime_fp32": lambda: sessions["fp32"].run(None, {"input": sample}),
                      "onnxruntime_int8": lambda: sessions["int8"].run(None, {"input": sample})}, SPEED_ROUNDS)
    ips = {k: SPEED_BATCH / s for k, s in seconds.items()}
    return Int8Check(split=split, images=n, agreement=agree / n, accuracy_fp32=right32 / n, accuracy_int8=right8 / n,
                     images_per_s=ips, calibration_images=used, threads=threads,
                     speedup_vs_timm={k: ips[k] / ips["timm_eager_fp32"] for k in ("onnxruntime_fp32", "onnxruntime_int8")},
                     skipped=calib.skipped + checked.skipped, pixel_range=float(np.median(calib.ranges)))


def report(check: Int8Check, out: Path) -> None:
    """Print the check and write it beside the int8 file (atomically)."""
    for item in check.skipped:
        log.warning("skipped an unreadable %s image: %s (%s)", item["split"], item["path"], item["reason"])
    note = "" if check.split == "test" else " (the run has no test images)"
    ips, ratio = check.images_per_s, check.speedup_vs_timm
    lines = [
        f"int8 calibrated on {check.calibration_images} train images; checked on {check.images} "
        f"{check.split} images{note}",
        f"top-1 agreement with fp32: {check.agreement:.4f}",
        f"accuracy: fp32 {check.accuracy_fp32:.4f}, int8 {check.accuracy_int8:.4f}",
        f"images/s at batch {check.batch_size}, {check.threads} threads: timm eager fp32 {ips['timm_eager_fp32']:.1f}, "
        f"ONNX Runtime fp32 {ips['onnxruntime_fp32']:.1f} ({ratio['onnxruntime_fp32']:.2f}x), "
        f"int8 {ips['onnxruntime_int8']:.1f} ({ratio['onnxruntime_int8']:.2f}x)",
    ]
    for line in lines:
        console.print(line, highlight=False, markup=False)
    if check.agreement < AGREEMENT_FLOOR:
        faint = "" if check.pixel_range >= FAINT_RANGE else (
            f"; the train images span a median of only {check.pixel_range:g} pixel values from darkest to "
            "brightest, which 256 activation levels cannot follow: stretching their contrast before training "
            "would help")
        log.warning("the int8 model predicts as the fp32 one on only %.1f%% of the %s images (under %.0f%%): "
                    "deploy the fp32 file (--format onnx) unless that loss is acceptable%s",
                    100 * check.agreement, check.split, 100 * AGREEMENT_FLOOR, faint)
    with atomic_write(check_json_path(out)) as tmp:
        tmp.write_text(json.dumps(asdict(check), indent=2) + "\n", encoding="utf-8")
