"""Whether a benchmark's batches fit in memory, checked before any is made.

A size the machine cannot hold would otherwise end in an allocation error (or the kernel's
out-of-memory killer) after the models are built. The need is estimated from the network itself:
one forward pass on PyTorch's "meta" device, which computes every shape and allocates nothing,
sums the outputs of its layers, which a backward pass keeps.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..errors import EffftError

_BYTES = {"fp32": 4, "bf16": 2}


def activation_bytes(name: str, *, batch_size: int, image_size: int, dtype: str = "fp32") -> int:
    """About what a forward and backward pass of `name` at this batch holds: the batch and the
    output of every layer."""
    from ..model.registry import create_model

    with torch.device("meta"):
        model = create_model(name, drop_rate=0.0, drop_path_rate=0.0)
        x = torch.empty(1, 3, image_size, image_size)
    total = [x.numel()]

    def count(module: torch.nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()

    for module in model.modules():
        if not any(module.children()):
            module.register_forward_hook(count)
    model.eval()  # the same shapes as in training; BatchNorm in training mode refuses a batch of one
    model(x)
    return total[0] * batch_size * _BYTES.get(dtype, 4)


def available_bytes(device: str) -> int | None:
    """Memory free for a new allocation on `device`, or None where it cannot be told."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    found = []
    try:  # the kernel's estimate of what can be had without swapping
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            pass
    try:  # a container's own limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_fits(args: argparse.Namespace) -> None:
    """Refuse --image-size and --batch-size that the machine cannot hold (an EffftError saying
    what they would need and what there is), before anything is built."""
    if args.part == "data":  # one image at a time: the decoded image, then its float tensor
        need = 3 * args.image_size ** 2 * (1 + 4 + 4)
        what = f"one {args.image_size} px image through the train pipeline"
        device = "cpu"
    else:
        device = args.device if args.part == "model" else "cpu"
        dtype = getattr(args, "dtype", "fp32") if args.part == "model" else "fp32"
        need = activation_bytes(args.model, batch_size=args.batch_size, image_size=args.image_size, dtype=dtype)
        what = (f"a forward and backward pass of {args.model} on a batch of {args.batch_size} at "
                f"{args.image_size} px")
    free = available_bytes(device)
    if free is not None and need > free:
        given = f"--image-size {args.image_size}" + ("" if args.part == "data" else f", --batch-size {args.batch_size}")
        smaller = "--image-size" if args.part == "data" else "--image-size or --batch-size"
        raise EffftError(f"{given}: {what} needs about {_size(need)} of memory, and {device} has {_size(free)} "
                         f"free: choose a smaller {smaller}")


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
