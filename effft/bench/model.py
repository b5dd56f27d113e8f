"""`effft bench model`: our network's speed against timm's, measured in one process (forward,
forward + backward, and the forward of effft's inference model with BatchNorm folded).

Both models get the same weights, batch, input size, threads and memory format; they run in
alternation, round by round, so drift in the machine's speed hits both alike. We report the
median images/s of each and their ratio (ours / reference: above 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext
from typing import Callable

import torch

from ..errors import EffftError
from .rounds import alternate, print_table


def reference_model(name: str) -> torch.nn.Module:
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


def _repeated(step: Callable[[], None], iters: int, device: torch.device) -> Callable[[], None]:
    """`iters` calls of `step` as one timed unit; on a GPU its queued work is finished on either side."""
    def run() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        for _ in range(iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return run


def compare(
    name: str, *, batch_size: int, image_size: int, rounds: int, iters: int, device: str = "cpu",
    dtype: str = "fp32", channels_last: bool = False, compiled: bool = False,
) -> dict[str, dict[str, float]]:
    """images/s of ours and the reference for forward and forward+backward, and their ratios.
    `compiled`: a fourth row, the folded model through torch.compile (its compilation is in the
    warm-up, not in the timed rounds) against timm's eager forward."""
    from ..model.registry import create_model

    dev = torch.device(device)
    ref = reference_model(name)
    ours = create_model(name, drop_rate=0.0, drop_path_rate=0.0)
    ours.load_state_dict(ref.state_dict())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    models = {"effft": ours.to(dev, memory_format=memory_format), "timm": ref.to(dev, memory_format=memory_format)}
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev).to(memory_format=memory_format)

    def autocast():
        if dtype == "bf16":
            return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        return nullcontext()

    from ..model.fuse import fuse_for_inference

    fused = fuse_for_inference(ours.eval()).to(dev)  # channels_last, as predict and export run it
    results: dict[str, dict[str, float]] = {}
    # the third row: effft's inference model (BatchNorm folded, as predict and export use it)
    # against timm's eager eval forward
    modes = [("forward", False), ("forward+backward", True), ("forward, BN folded", False)]
    if compiled:
        modes.append(("forward, BN folded, compiled", False))
    for mode, train in modes:
        steps = {}
        for key, model in models.items():
            if key == "effft" and mode.startswith("forward, BN folded"):
                model = fused if mode == "forward, BN folded" else torch.compile(fused)
            model.train(train)
            steps[key] = _step_fn(model, x, train=train, autocast=autocast)
            steps[key]()  # warm-up
        times = alternate(rounds, {k: _repeated(step, iters, dev) for k, step in steps.items()})
        ips = {k: batch_size * iters / statistics.median(v) for k, v in times.items()}
        ratios = [t_ref / t_ours for t_ours, t_ref in zip(times["effft"], times["timm"])]
        results[mode] = {**ips, "ratio": statistics.median(ratios)}
    return results


def run_model_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    results = compare(
        args.model, batch_size=args.batch_size, image_size=args.image_size, rounds=args.rounds,
        iters=args.iters, device=args.device, dtype=args.dtype, channels_last=args.channels_last,
        compiled=args.compile,
    )
    where = f"{args.device}, {torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print_table(f"{args.model}, batch {args.batch_size}, {args.image_size} px, {args.dtype}"
                f"{', channels_last' if args.channels_last else ''}, {where}",
                ("mode", "effft img/s", "timm img/s", "ratio effft/timm"),
                [(mode, f"{r['effft']:.1f}", f"{r['timm']:.1f}", f"{r['ratio']:.3f}") for mode, r in results.items()])
    return 0
