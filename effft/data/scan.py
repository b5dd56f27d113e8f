"""Find the files of a data set that cannot be read, before a run trips over them."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from effft.console import console
from effft.data.decode import BadImageError, image_size, read_image
from effft.data.sources._common import BadFile

log = logging.getLogger(__name__)

PROGRESS_FROM = 200  # fewer files than this scan too fast for a bar to be worth drawing


def _check(path: str, decode: bool) -> BadFile | None:
    try:
        if decode:
            read_image(path)
        else:
            if os.path.getsize(path) == 0:
                return BadFile(path, "empty file (0 bytes)")
            image_size(path)
    except BadImageError as e:
        return BadFile(path, e.reason)
    except OSError as e:  # vanished or unreadable between listing and checking
        return BadFile(path, f"cannot open the file ({e.strerror or e})")
    return None


def scan(
    paths: Sequence[str],
    *,
    decode: bool = True,
    progress: bool = True,
    workers: int | None = None,
) -> list[BadFile]:
    """The files among `paths` that cannot be read, each with the reason, in the given order.

    With `decode` every file is fully decoded (finds truncated and corrupt files); without, only
    the header is read (finds empty files and files that are not images at all). Decoding runs
    in a thread pool (Pillow and the DICOM decoders release the GIL), with a progress bar for
    more than a few hundred files.
    """
    paths = [str(p) for p in paths]
    if not paths:
        return []
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    results: list[BadFile | None] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="effft-scan") as pool:
        checks = pool.map(lambda p: _check(p, decode), paths)
        if progress and len(paths) > PROGRESS_FROM:
            columns = (TextColumn("checking images"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn())
            with Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task("scan", total=len(paths))
                for result in checks:
                    results.append(result)
                    bar.advance(task)
        else:
            results = list(checks)
    bad = [r for r in results if r is not None]
    log.info("scanned %d files, %d unreadable", len(paths), len(bad))
    return bad


def format_bad_files(bad: Sequence[BadFile], limit: int = 20) -> str:
    """One plain-text summary: how many, then `path: reason` lines, then "and N more".

    Empty when nothing is bad. Print it with `markup=False`: paths may hold brackets.
    """
    if not bad:
        return ""
    noun = "file" if len(bad) == 1 else "files"
    lines = [f"{len(bad)} {noun} could not be read:"]
    lines += [f"  {b.path}: {b.reason}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)
