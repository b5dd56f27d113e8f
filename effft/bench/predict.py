"""`effft bench predict`: `effft predict` end to end, JPEG files to the CSV, against the model's
own forward on ready batches, measured in one process.

Both use the same run (a model of random weights: speed does not depend on them), its network
with BatchNorm folded as predict runs it, the same batch size, device, precision and threads.
The forward is timed over as many images as predict reads, in whole batches of one random
tensor made once. predict is the command's own function, timed from the call to the renamed
CSV: reading the checkpoint and starting the loader workers count too, so on a fast device
give `--limit` enough images that they are small against the rest. The JPEGs are generated
photo-like (smooth content, 300 to 500 pixels a side, of varied shapes). The two run in
alternation, round by round; we report the median images/s of each and the median ratio
(predict / forward: 1 means reading the files costs the model nothing).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.table import Table

from ..console import console

CLASSES = [f"class_{i}" for i in range(10)]


def random_run(path: Path, *, model_name: str, image_size: int) -> Path:
    """An effft checkpoint of `model_name` with random weights for ten classes, fed at
    `image_size` with ImageNet statistics: what predict needs, without downloading weights."""
    from ..input import InputSpec
    from ..model.registry import create_model

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=len(CLASSES)).eval()
    spec = InputSpec(size=image_size)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "effft": {"recipe": {"data": {"image_size": image_size}}, "model_name": model_name, "in_chans": 3,
                          "bn_eps": model.bn1.eps, "preprocessing": spec.to_dict(), "input": spec.to_dict(),
                          "classes": CLASSES, "task": "multiclass", "threshold": 0.5}}, path)
    return path


def photo_like_jpegs(folder: Path, count: int, *, low: int = 300, high: int = 500) -> list[Path]:
    """`count` JPEGs of smooth colour noise, each side drawn from [low, high] pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(low, high + 1, 2))
        small = rng.integers(0, 256, (max(1, h // 12), max(1, w // 12), 3), dtype=np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def _forward_seconds(model: torch.nn.Module, x: torch.Tensor, batches: int, *, autocast) -> float:
    device = x.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast():
        for _ in range(batches):
            model(x).float().softmax(-1).cpu()  # the probabilities reach the CPU, as predict's do
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_predict_bench(args: argparse.Namespace) -> int:
    from ..device import check_precision
    from ..infer.loaded_run import load_run
    from ..infer.predict import predict
    from ..infer.reading import default_workers
    from ..model.fuse import fuse_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    check_precision(args.dtype, device)
    count, batch_size = args.limit, args.batch_size
    workers = default_workers(count, batch_size) if args.workers is None else args.workers
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_run(Path(tmp) / "run.ckpt", model_name=args.model, image_size=args.image_size)
        folder = Path(tmp) / "images"
        photo_like_jpegs(folder, count)
        model = fuse_for_inference(load_run(ckpt).model).to(device)
        x = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
        batches = math.ceil(count / batch_size)

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

        def end_to_end() -> float:
            start = time.perf_counter()
            with console.capture():  # predict's closing line, once per round: not for the table
                predict(ckpt, [folder], out=Path(tmp) / "predictions.csv", batch_size=batch_size, progress=False,
                        workers=workers, device=args.device, precision=args.dtype)
            return time.perf_counter() - start

        _forward_seconds(model, x, 1, autocast=autocast)  # warm-up
        end_to_end()
        rows = (Path(tmp) / "predictions.csv").read_text().splitlines()
        if len(rows) != count + 1:
            raise RuntimeError(f"predict wrote {len(rows) - 1} rows for {count} images")
        times: dict[str, list[float]] = {"forward": [], "predict": []}
        for r in range(args.rounds):
            for what in (("forward", "predict") if r % 2 == 0 else ("predict", "forward")):
                seconds = _forward_seconds(model, x, batches, autocast=autocast) if what == "forward" else end_to_end()
                times[what].append(seconds)
    forward_ips = batches * batch_size / statistics.median(times["forward"])
    predict_ips = count / statistics.median(times["predict"])
    ratios = [(count / p) / (batches * batch_size / f) for f, p in zip(times["forward"], times["predict"])]
    where = f"cpu, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    table = Table(title=f"{args.model}, {count} JPEGs of 300-500 px, batch {batch_size}, {args.image_size} px, "
                        f"{args.dtype}, {where}, {workers} loader workers, median of {args.rounds} rounds")
    for col in ("", "forward img/s", "predict img/s", "ratio predict/forward"):
        table.add_column(col, justify="right")
    table.add_row("files -> CSV", f"{forward_ips:.1f}", f"{predict_ips:.1f}", f"{statistics.median(ratios):.3f}")
    console.print(table)
    return 0
