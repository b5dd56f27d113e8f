"""`effft bench predict`: `effft predict` end to end, JPEG files to the CSV, against the model's
own forward on ready batches, measured in one process.

Both use the same run (a model of random weights: speed does not depend on them), its network
with BatchNorm folded as predict runs it, the same batch size, device, precision and threads.
The forward is timed over as many images as predict reads, in whole batches of one random
tensor made once. predict is timed two ways, from the files to the renamed CSV:

- files -> CSV: the command's own streaming (`predict.stream_csv`: loader workers started,
  files read, decoded and prepared, the model, the rows written) with the run loaded and fused
  once, as the forward's model is made once: what a large folder sees;
- the whole command (`predict.predict`): loading the checkpoint and folding its BatchNorm too,
  a cost of each command whatever the number of files.

With `--compile`, the forward and files -> CSV are also timed with the model through
torch.compile (`predict --compile`, compiled once before the rounds), and their gain over the
eager ones is printed, round by round.

The JPEGs are photo-like (smooth content, 300 to 500 pixels a side, of varied shapes). The three
run in alternation, round by round; we report the median images/s of each and the median ratio
of each round (predict / forward: 1 means reading the files costs the model nothing).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from ..console import console
from .rounds import alternate, print_table

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


def _forward(model: torch.nn.Module, x: torch.Tensor, batches: int, *, bf16: bool) -> None:
    """`batches` forwards of `x`, their probabilities brought to the CPU as predict's are."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.no_grad(), autocast:
        for _ in range(batches):
            model(x).float().softmax(-1).cpu()  # .cpu() waits for a GPU's work: nothing left running


def run_predict_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..device import check_precision
    from ..infer.loaded_run import load_run
    from ..infer.predict import compiled, predict, stream_csv
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
        folder, out = Path(tmp) / "images", Path(tmp) / "predictions.csv"
        files = photo_like_jpegs(folder, count)
        run = load_run(ckpt)
        run = replace(run, model=fuse_for_inference(run.model).to(device))  # as predict prepares it
        x = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
        batches = math.ceil(count / batch_size)

        runs = {"": run}
        if args.compile:  # compiled once, before the rounds, as the forward's model is made once
            with console.capture():
                runs[", compiled"] = compiled(run, batch_size=batch_size, precision=args.dtype)

        def forward(model: torch.nn.Module, n: int) -> None:
            _forward(model, x, n, bf16=args.dtype == "bf16")

        def streamed(loaded: Any) -> None:
            with console.capture():  # predict's closing line, once a round: not for the table
                stream_csv(loaded, files, out=out, batch_size=batch_size, progress=False, workers=workers,
                           precision=args.dtype)

        def command() -> None:
            with console.capture():
                predict(ckpt, [folder], out=out, batch_size=batch_size, progress=False, workers=workers,
                        device=args.device, precision=args.dtype)

        steps: dict[str, Callable[[], None]] = {}
        for tag, loaded in runs.items():
            forward(loaded.model, 1)  # warm-up
            steps[f"forward{tag}"] = partial(forward, loaded.model, batches)
            steps[f"streamed{tag}"] = partial(streamed, loaded)
        command()
        written = len(out.read_text().splitlines()) - 1
        if written != count:
            raise RuntimeError(f"predict wrote {written} rows for {count} images")
        times = alternate(args.rounds, {**steps, "command": command})
    where = f"cpu, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    forward_ips = {tag: [batches * batch_size / t for t in times[f"forward{tag}"]] for tag in runs}
    rows = []
    for key, label, tag in [(f"streamed{tag}", f"files -> CSV{tag}", tag) for tag in runs] + \
            [("command", "the whole command", "")]:
        ips = [count / t for t in times[key]]
        rows.append((label, f"{statistics.median(forward_ips[tag]):.1f}", f"{statistics.median(ips):.1f}",
                     f"{statistics.median(p / f for p, f in zip(ips, forward_ips[tag])):.3f}"))
    print_table(f"{args.model}, {count} JPEGs of 300-500 px, batch {batch_size}, {args.image_size} px, {args.dtype}, "
                f"{where}, {workers} loader workers, median of {args.rounds} rounds",
                ("predict", "forward img/s", "predict img/s", "ratio predict/forward"), rows)
    if args.compile:
        gain = {key: statistics.median(a / b for a, b in zip(times[key], times[f"{key}, compiled"]))
                for key in ("forward", "streamed")}
        console.print(f"compiled against eager, round by round: forward {gain['forward']:.2f}x, files -> CSV "
                      f"{gain['streamed']:.2f}x (the compilation itself is not in these)", highlight=False)
    return 0
