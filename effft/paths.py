"""Writing files whole or not at all, and checks of the places a user asks effft to write,
made before any work is done."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import EffftError


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block ends without an error the file
    is synced to disk and renamed to `path` in one step, otherwise it is removed. Readers see the
    old file or the whole new one, never a part: a full disk or a crash leaves `path` as it was.

    A full disk (or another failure to write) is an EffftError naming `path`, not the temporary.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _refuse_full_disk(exc, path, left="Nothing was written there.")
        if exc.filename is not None and Path(exc.filename) == tmp:
            exc.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_full_disk(exc: OSError, path: Path, *, left: str) -> None:
    """A full disk while writing `path` is an EffftError saying so and what `left` there."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise EffftError(f"cannot write {path}: {exc.strerror} (the disk is full); free some space "
                         f"in {path.parent} and try again. {left}") from None


def partial_path(path: Path) -> Path:
    """Where `growing_file` writes `path` until it is complete: `<path>.partial` beside it."""
    return Path(path).with_name(Path(path).name + ".partial")


@contextmanager
def growing_file(path: Path) -> Iterator[Callable[[str], None]]:
    """A text file written piece by piece, for output that should be seen as it comes.

    Each call of the function yielded appends one piece to `partial_path(path)` in one write to
    the operating system, so a process killed at any moment leaves whole pieces there. When the
    block ends without an error the file is synced to disk and renamed to `path` in one step;
    otherwise it is left as it is, and `path` is never there unfinished. The partial file of an
    earlier attempt is replaced.
    """
    path = Path(path)
    partial = partial_path(path)
    try:
        with open(partial, "wb", buffering=0) as f:
            def append(text: str) -> None:
                data = memoryview(text.encode("utf-8"))
                while data:  # a regular file takes it all at once; a short write goes on
                    data = data[f.write(data):]
            yield append
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as exc:
        _refuse_full_disk(exc, path, left=f"What was written so far is in {partial}.")
        raise


def output_file(path: Path, *, flag: str, example: str) -> Path:
    """`path` as a file to write: its folder is made; a folder at `path`, or a folder that cannot
    be made or written, is an EffftError naming `flag` and the path. `example`: a file name to
    suggest inside a folder given by mistake."""
    path = Path(path)
    if path.is_dir():
        raise EffftError(f"{flag} {path} is a folder: give the path of a file to write, e.g. {path / example}")
    _writable_folder(path.parent, flag=flag, given=path)
    return path


def output_folder(path: Path, *, flag: str) -> Path:
    """`path` as a folder to write into, made if needed; a file there, or a folder that cannot be
    made or written, is an EffftError naming `flag` and the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EffftError(f"{flag} {path} is a file: give a folder (it is made if missing)")
    _writable_folder(path, flag=flag, given=path)
    return path


def _writable_folder(folder: Path, *, flag: str, given: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EffftError(f"{flag} {given}: the folder {folder} cannot be made ({exc.strerror or exc}): "
                         "choose a place you can write to") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EffftError(f"{flag} {given}: the folder {folder} is not writable: choose a place you can write to")


def can_make_folder(path: Path, *, what: str) -> Path:
    """Check, writing nothing, that the folder `path` exists or can be made: the nearest existing
    part of it must be a writable folder. `what` names the setting in the error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EffftError(f"{what} {path} is a file: give a folder (it is made if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise EffftError(f"{what} {path}: {existing} is a file, so no folder can be made under it: choose another place")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EffftError(f"{what} {path}: {existing} is not writable: choose a place you can write to")
    return path
