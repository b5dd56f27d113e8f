"""`effft bench`: our speed against the reference implementation, measured in one process.

Both models get the same weights, batch, input size, threads and memory format; they run in
alternation, round by round, so drift in the machine's speed hits both alike. We report the
median images/s of each and their ratio (ours / reference: above 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from rich.table import Table

from .console import console
from .errors import EffftError


def _reference_model(name: str) -> torch.nn.Module:
    try:
        import timm
    except ImportError:
        raise EffftError("the benchmark compares against timm, which is not installed: pip install 'effft[bench]'") from None
    return timm.create_model(name)


def _step_fn(model: torch.nn.Module, x: torch.Tensor, *, train: bool, autocast) -> Callable[[], None]:
    if not train:
        def forward() -> None:
            with torch.no_grad(), autocast():
                model(x)
        return forward

    def forward_backward() -> None:
        with autocast():
            loss = model(x).float().logsumexp(dim=1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
    return forward_backward


def _time(step: Callable[[], None], iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(
    name: str, *, batch_size: int, image_size: int, rounds: int, iters: int, device: str = "cpu",
    dtype: str = "fp32", channels_last: bool = False,
) -> dict[str, dict[str, float]]:
    """images/s of ours and the reference for forward and forward+backward, and their ratios."""
    from .model.efficientnet import create_model

    dev = torch.device(device)
    ref = _reference_model(name)
    ours = create_model(name, drop_rate=0.0, drop_path_rate=0.0)
    ours.load_state_dict(ref.state_dict())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    models = {"effft": ours.to(dev, memory_format=memory_format), "timm": ref.to(dev, memory_format=memory_format)}
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev).to(memory_format=memory_format)

    def autocast():
        if dtype == "bf16":
            return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        return nullcontext()

    results: dict[str, dict[str, float]] = {}
    for mode, train in (("forward", False), ("forward+backward", True)):
        steps = {}
        for key, model in models.items():
            model.train(train)
            steps[key] = _step_fn(model, x, train=train, autocast=autocast)
            steps[key]()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in models}
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for key in order:
                times[key].append(_time(steps[key], iters, dev))
        ips = {k: batch_size * iters / statistics.median(v) for k, v in times.items()}
        ratios = [t_ref / t_ours for t_ours, t_ref in zip(times["effft"], times["timm"])]
        results[mode] = {**ips, "ratio": statistics.median(ratios)}
    return results


def run_bench(args: argparse.Namespace) -> int:
    from .model.efficientnet import get_variant

    get_variant(args.model)  # an unknown name: the error with close matches, before any work
    if args.part == "data":
        return run_data_bench(args)
    if args.part == "fit":
        return run_fit_bench(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EffftError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    results = compare(
        args.model, batch_size=args.batch_size, image_size=args.image_size, rounds=args.rounds,
        iters=args.iters, device=args.device, dtype=args.dtype, channels_last=args.channels_last,
    )
    where = f"{args.device}, {torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    table = Table(title=f"{args.model}, batch {args.batch_size}, {args.image_size} px, {args.dtype}"
                  f"{', channels_last' if args.channels_last else ''}, {where}")
    for col in ("mode", "effft img/s", "timm img/s", "ratio effft/timm"):
        table.add_column(col, justify="right")
    for mode, r in results.items():
        table.add_row(mode, f"{r['effft']:.1f}", f"{r['timm']:.1f}", f"{r['ratio']:.3f}")
    console.print(table)
    return 0


# ---------------------------------------------------------------------------- data


def _large_images(folder: Path, count: int, side: int = 2000) -> Path:
    """`count` JPEGs about the size of chest X-rays, in two class folders (smooth grey noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        cls = folder / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (side // 16, side // 16), dtype=np.uint8)
        Image.fromarray(small).resize((side, side - side // 10), Image.BICUBIC).save(cls / f"{i}.jpg", quality=90)
    return folder


def pipeline_throughput(root: Path, *, image_size: int, cache: str, cache_dir: Path, limit: int) -> tuple[float, float]:
    """(seconds to set up, incl. building the cache; train images/s through decode + augment),
    in one process, so the figure is per loader worker."""
    from .data.config import DataConfig
    from .data.datamodule import EffftDataModule
    from .model.tags import Preprocessing

    cfg = DataConfig.model_validate({"adapter": "folder", "root": str(root), "num_workers": 0, "cache": cache,
                                     "cache_dir": str(cache_dir), "split": {"train": 0.8, "val": 0.1, "test": 0.1}})
    dm = EffftDataModule(cfg, preprocessing=Preprocessing(input_size=image_size), progress=False)
    start = time.perf_counter()
    dm.setup()
    setup = time.perf_counter() - start
    ds = dm.dataset("train")
    n = min(limit, len(ds))
    ds[(0, 0)]  # warm-up
    start = time.perf_counter()
    for i in range(n):
        ds[(i, i)]
    return setup, n / (time.perf_counter() - start)


def run_data_bench(args: argparse.Namespace) -> int:
    import tempfile

    torch.set_num_threads(1)  # a loader worker is one process on one core
    with tempfile.TemporaryDirectory() as tmp:
        sets = {}
        if args.root:
            if not Path(args.root).is_dir():
                raise EffftError(f"--root {args.root} is not a folder of class folders")
            sets[f"{args.root}"] = Path(args.root)
        sets[f"{args.large} generated 2000 px JPEGs"] = _large_images(Path(tmp) / "large", args.large)
        table = Table(title=f"train pipeline, {args.image_size} px, one process (per loader worker)")
        for col in ("data", "from files img/s", "from cache img/s", "ratio cache/files", "cache build s"):
            table.add_column(col, justify="right")
        for label, root in sets.items():
            _, files = pipeline_throughput(root, image_size=args.image_size, cache="off", cache_dir=Path(tmp) / "c", limit=args.limit)
            build, cached = pipeline_throughput(root, image_size=args.image_size, cache="disk", cache_dir=Path(tmp) / "c", limit=args.limit)
            table.add_row(label, f"{files:.1f}", f"{cached:.1f}", f"{cached / files:.2f}", f"{build:.1f}")
        console.print(table)
    return 0


# ---------------------------------------------------------------------------- fit


def _reference_epoch_seconds(root: Path, *, arch: str, image_size: int, batch_size: int, workers: int,
                             lr: float, seed: int) -> float:
    """One training epoch of a plain Lightning loop around timm's model: torchvision's
    ImageFolder and transforms, AdamW, cross-entropy; what a user would write by hand."""
    import lightning as L
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    timm_model = _reference_model(arch)
    timm_model.reset_classifier(len([d for d in root.iterdir() if d.is_dir()]))

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm_model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=lr)

    tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.25, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = DataLoader(datasets.ImageFolder(str(root), tf), batch_size=batch_size, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0)
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(Plain(), loader)
    return time.perf_counter() - start


def _effft_epoch_seconds(root: Path, out: Path, *, arch: str, image_size: int, batch_size: int, workers: int,
                         lr: float, seed: int) -> float:
    """One training epoch of `effft fit` on the same data (no validation or test pass)."""
    from .recipe import validate
    from .run import build, make_trainer

    recipe = validate({
        "name": "bench", "seed": seed, "output_dir": str(out),
        "model": {"arch": arch, "pretrained": False},
        "data": {"adapter": "folder", "root": str(root), "image_size": image_size, "batch_size": batch_size,
                 "num_workers": workers, "split": {"train": 0.98, "val": 0.01, "test": 0.01}},
        "optimizer": {"lr": lr}, "trainer": {"max_epochs": 1, "accelerator": "cpu", "limit_val_batches": 0},
    })
    built = build(recipe, progress=False)
    trainer = make_trainer(recipe, out / "bench", task=built.datamodule.task, classes=built.datamodule.classes, quiet=True)
    start = time.perf_counter()
    trainer.fit(built.module, datamodule=built.datamodule)
    return time.perf_counter() - start


def run_fit_bench(args: argparse.Namespace) -> int:
    import tempfile

    if not args.root or not Path(args.root).is_dir():
        raise EffftError("effft bench fit needs --root, a folder of class folders "
                         "(e.g. datasets/quickstart_digits from datasets/make_quickstart.py)")
    root = Path(args.root)
    common = dict(arch=args.model, image_size=args.image_size, batch_size=args.batch_size,
                  workers=args.workers, lr=1e-3, seed=0)
    if args.threads:
        torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"effft": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["effft", "reference"] if r % 2 == 0 else ["reference", "effft"]
            for key in order:
                if key == "effft":
                    times[key].append(_effft_epoch_seconds(root, Path(tmp) / f"r{r}", **common))
                else:
                    times[key].append(_reference_epoch_seconds(root, **common))
    ratios = [ref / ours for ours, ref in zip(times["effft"], times["reference"])]
    table = Table(title=f"one training epoch on {root}: {args.model}, {args.image_size} px, batch {args.batch_size}, "
                        f"{args.workers} loader workers, {torch.get_num_threads()} threads")
    for col in ("", "effft fit s", "Lightning + timm s", "speed ratio effft/reference"):
        table.add_column(col, justify="right")
    table.add_row("median", f"{statistics.median(times['effft']):.1f}", f"{statistics.median(times['reference']):.1f}",
                  f"{statistics.median(ratios):.3f}")
    console.print(table)
    return 0
