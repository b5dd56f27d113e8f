"""The run directory and what a checkpoint says about its run.

    <output_dir>/<name>/
        recipe.yaml  splits.csv  classes.json  bad_files.csv
        checkpoints/best.ckpt  checkpoints/last.ckpt
        logs/  metrics.json  report/  summary.md
        tests/<same_data|other_data>/   what `effft test` writes
        .lock        held by the `effft fit` writing the directory

A checkpoint holds, beside the weights, an `effft` entry: the resolved recipe, the classes, the
task, the InputSpec, the threshold. `test`, `predict`, `explain` and `export` rebuild the run
from it alone.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import EffftError
from ..input import InputSpec

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LOCK = ".lock"
# what `effft fit` and `effft test` write in a run directory: no other command writes there
RUN_ENTRIES = ("recipe.yaml", "splits.csv", "classes.json", "bad_files.csv", "metrics.json", "summary.md",
               "lr_find.png", CHECKPOINTS, "logs", "report", "tests", LOCK)


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (its folder, for a checkpoint elsewhere)."""
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent


def checkpoint_path(target: Path) -> Path:
    """best.ckpt of a run directory, or the checkpoint file given."""
    return target / CHECKPOINTS / "best.ckpt" if target.is_dir() else target


def read_checkpoint(ckpt: Path, *, advice: str = "give a run directory made by `effft fit` or its "
                    "checkpoints/best.ckpt") -> dict[str, Any]:
    """A checkpoint file as plain data, read safely (`weights_only`); an unreadable file is an
    EffftError naming it and giving `advice`, never torch's advice to load it unsafely."""
    try:
        with warnings.catch_warnings():  # torch's notes on the pickle protocol of odd files: nothing to act on
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol")
            data = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        reason = "it is not a checkpoint, or it is damaged" if "Weights only load failed" in str(exc) or \
            isinstance(exc, pickle.UnpicklingError) else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EffftError(f"cannot read checkpoint {ckpt}: {reason}; {advice}") from None
    if not isinstance(data, dict):
        raise EffftError(f"{ckpt} was not written by effft fit (no recipe inside)")
    return data


def load_checkpoint_meta(target: Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint path, its effft metadata) from a run directory or a checkpoint file."""
    ckpt = checkpoint_path(Path(target))
    if not ckpt.exists():
        raise EffftError(f"no checkpoint at {ckpt}: give a run directory made by `effft fit` or a .ckpt file")
    meta = read_checkpoint(ckpt).get("effft")
    if not isinstance(meta, dict) or "recipe" not in meta:
        raise EffftError(f"{ckpt} was not written by effft fit (no recipe inside)")
    return ckpt, meta


def update_checkpoint_meta(ckpt: Path, **entries: Any) -> None:
    """Put `entries` into a checkpoint's `effft` entry (what is decided after training, such as
    the temperature), rewriting the file whole."""
    import io

    from ..paths import atomic_write

    data = read_checkpoint(ckpt)
    data.setdefault("effft", {}).update(entries)
    buffer = io.BytesIO()
    torch.save(data, buffer)
    with atomic_write(ckpt) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def input_spec(meta: dict[str, Any], ckpt: Path) -> InputSpec:
    """The InputSpec a checkpoint's run was trained with."""
    try:
        if "input" in meta:
            return InputSpec.from_dict(meta["input"])
        # written by effft 0.1: the weights' preprocessing and the recipe's image size
        weights = InputSpec.from_dict(meta["preprocessing"])
        size = (meta["recipe"].get("data") or {}).get("image_size") or weights.size
        return InputSpec(**{**weights.__dict__, "size": int(size)}).for_channels(int(meta["in_chans"]))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise EffftError(f"the 'effft' entry of {ckpt} is malformed ({exc!r}): was the file edited?") from None


# ---------------------------------------------------------------------------- who writes where


def is_run_dir(path: Path) -> bool:
    """Whether `path` looks like a run directory made by `effft fit` (a project folder with a
    checkpoints/ folder of its own does not)."""
    return (path / "recipe.yaml").is_file() and ((path / "classes.json").is_file() or (path / CHECKPOINTS).is_dir())


def made_by_fit(run_dir: Path) -> bool:
    """Whether `effft fit` wrote this directory, even where it stopped early: what --overwrite may
    delete (a folder of the user's, named as a run by mistake, is not)."""
    return any((run_dir / name).exists() for name in (LOCK, "recipe.yaml", "splits.csv", "classes.json"))


def run_dir_busy(run_dir: Path) -> bool:
    """Whether the run directory holds anything but its lock file."""
    return run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir())


def clear_run_dir(run_dir: Path) -> None:
    """Delete what the run directory holds, but not its lock file, which this process holds
    (deleting it would let another run take a fresh one)."""
    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run directory (made if missing) for this process until the block ends, or the
    process does: a second `effft fit` of the same run is refused, naming it, rather than mixing
    its files with this one's. An OS lock (flock) on `run_dir/.lock`, so a crash releases it.
    A directory made here and left with nothing but the lock (the run failed before writing) is
    removed again, with the folders made for it."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: runs are not guarded against each other
        yield
        return
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # the run's folder first
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise EffftError(f"the run directory {run_dir} is in use by another effft fit"
                             f"{f' (process {holder})' if holder.isdigit() else ''}: wait for it to end, or give "
                             "this run another name (--set name=...)") from None
        except OSError as exc:  # a file system without locks (some network mounts)
            log.warning("cannot lock %s (%s): nothing stops another effft fit from writing the same run",
                        run_dir / LOCK, exc.strerror or exc)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            if made and run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == [LOCK]:  # held: no run is in it
                (run_dir / LOCK).unlink()
                for folder in made:  # and the output_dir made for it, where nothing else went there
                    try:
                        folder.rmdir()
                    except OSError:
                        break
    finally:
        os.close(fd)


def check_output(out: Path, *, flag: str, inputs: Sequence[Path] = (), example: str, folder: bool = False,
                 data_root: Path | None = None) -> None:
    """Refuse an output path that would overwrite what the command reads, or a run's own files.

    `inputs`: the files (and folders) the command reads; `out` may not be one of them, and a
    `folder` output may not lie inside an input folder (what is written there would be read as
    input next time). Nor may `out` be, or lie inside, what `effft fit` writes in a run directory
    (checkpoints/, recipe.yaml, ...); other names inside a run directory (export/, explain/) are
    fine. `data_root`: the run's data, where no file may be overwritten (and no `folder` output
    go: give it only where the run's adapter walks that folder). `example`: a path to suggest instead.
    """
    target = _resolved(out)
    if data_root is not None and Path(data_root).exists():
        data = _resolved(data_root)
        if (folder and (target == data or data in target.parents)) or (target.exists() and data in target.parents):
            raise EffftError(f"{flag} {out} is inside the data the run was trained on ({data_root}, its data.root): "
                             f"writing there would change that data; choose a path outside it, e.g. {example}")
    for given in inputs:
        source = _resolved(given)
        if folder and source.is_dir() and (source == target or source in target.parents):
            raise EffftError(f"{flag} {out} is the input folder {given}, or inside it: what is written there would "
                             f"be read as input next time; choose a folder outside it, e.g. {example}")
        if target == source or (target.exists() and source.exists() and os.path.samefile(target, source)):
            raise EffftError(f"{flag} {out} is an input file of this command ({given}): writing it would destroy "
                             f"it; choose another path, e.g. {example}")
    for run in (target, *target.parents):
        if not is_run_dir(run):
            continue
        parts = target.relative_to(run).parts
        if not parts:
            raise EffftError(f"{flag} {out} is a run directory: writing into it would mix with the run's files; "
                             f"choose another path, e.g. {example}")
        if parts[0] in RUN_ENTRIES:
            raise EffftError(f"{flag} {out} is part of the run directory {run} ({parts[0]}, written by effft fit): "
                             f"writing it would damage the run; choose a path outside it, e.g. {example}")


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()
