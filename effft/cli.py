"""The `effft` command line: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from .console import console, err_console
from .errors import EffftError

log = logging.getLogger("effft")


def _models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .model.efficientnet import VARIANTS, parameter_count
    from .model.tags import KNOWN_WEIGHTS

    table = Table(title="EfficientNet variants (timm's names; weights from the Hugging Face hub under timm/)")
    table.add_column("name")
    table.add_column("params", justify="right")
    table.add_column("resolution", justify="right")
    table.add_column("known weight tags")
    for name, variant in VARIANTS.items():
        tags = ", ".join(KNOWN_WEIGHTS.get(name, {})) or "-"
        table.add_row(name, f"{parameter_count(name) / 1e6:.1f}M", str(variant.resolution), tags)
    console.print(table)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effft",
        description="Fine-tune EfficientNet on your own images. Start with `effft models`, "
        "or `effft fit recipes/quickstart.yaml`.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings, errors and the result")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debugging details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list the model variants, their size, resolution and known weights")
    p.set_defaults(func=_models)

    p = sub.add_parser("bench", help="measure our speed against the reference implementation")
    p.add_argument("part", choices=["model"], help="what to measure")
    p.add_argument("--model", default="efficientnet_b0", help="model name (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="input size in pixels (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds of each, alternating (default: %(default)s)")
    p.add_argument("--iters", type=int, default=3, help="batches per timed round (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype (default: %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="use the channels_last memory format")
    p.set_defaults(func=_bench)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the command, turn user errors into one message and an exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args) or 0
    except EffftError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
