"""Decode every image once: a flat uint8 store of resized images, on disk or in memory.

Each image is resized (never enlarged) so that its shorter side is what the pipelines need,
and stored HWC one after another in one buffer; an index holds each image's offset and shape.
On disk a cache is a folder named by a key, a hash of the file list, each file's size and
modification time, the shorter side and the channel count:

    <cache_dir>/<key>/pixels.bin   the buffer (read back with np.memmap)
    <cache_dir>/<key>/index.npz    offsets (N,) int64, shapes (N, 3) int64
    <cache_dir>/<key>/manifest.json  key, count, bytes: written last

Any change to the files gives another key, hence a new cache. A cache whose manifest is
missing or unreadable, whose key differs, or whose buffer or index has the wrong length (a
build cut short, a truncated copy) is rebuilt, never read. Files are written under temporary
names and renamed into place, the manifest last, so readers never see half a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from rich.progress import Progress

from ..console import console
from ..errors import EffftError, RecipeError
from ..paths import atomic_write, can_make_folder
from .sources._common import Item, Source

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the resize changes


def default_cache_dir() -> Path:
    """Where `data.cache: disk` keeps decoded images unless `data.cache_dir` says: the user's
    cache folder (XDG_CACHE_HOME, else ~/.cache), under effft/data."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "effft" / "data"


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """HWC image with its shorter side brought down to `short_side` (never enlarged)."""
    h, w = image.shape[:2]
    if min(h, w) <= short_side:
        return image
    scale = short_side / min(h, w)
    size = (short_side, round(h * scale)) if w <= h else (round(w * scale), short_side)
    out = cv2.resize(image, size, interpolation=cv2.INTER_AREA)  # area: best for shrinking
    return out[:, :, None] if out.ndim == 2 else out


def available_memory() -> int:
    """Bytes of memory free for use now (Linux: MemAvailable); 4 GiB where it cannot be told."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def cache_bytes(items: list[Item], *, short_side: int, channels: int) -> int | None:
    """What `items` take decoded at `short_side` (never enlarged), from their files' headers; None
    where a size cannot be read without decoding (images inside other files, DICOM frames)."""
    from .decode import image_size

    total = 0
    for it in items:
        if "::" in it.path or it.frame is not None:
            return None
        try:
            w, h = image_size(it.path)
        except Exception:  # noqa: BLE001 - unreadable files were scanned out already; be safe
            return None
        scale = min(1.0, short_side / max(1, min(w, h)))
        total += round(w * scale) * round(h * scale) * channels
    return total


def _file_of(item: Item) -> str:
    return item.path.rpartition("::")[0] or item.path


def cache_key(items: list[Item], *, short_side: int, channels: int) -> str:
    """A hash of what the cache holds: files (size, mtime), frames, shorter side, channels."""
    h = hashlib.sha256(f"effft-cache {FORMAT} {short_side} {channels}\n".encode())
    stats: dict[str, str] = {}
    for it in items:
        file = _file_of(it)
        if file not in stats:
            try:
                st = os.stat(file)
                stats[file] = f"{st.st_size} {st.st_mtime_ns}"
            except OSError:
                stats[file] = "missing"
        h.update(f"{it.path}\t{it.frame}\t{stats[file]}\n".encode())
    return h.hexdigest()[:32]


class ImageCache:
    """Images by position, read from one flat uint8 buffer."""

    def __init__(self, offsets: np.ndarray, shapes: np.ndarray, *, pixels: np.ndarray | None = None,
                 file: Path | None = None) -> None:
        self.offsets, self.shapes = offsets, shapes
        self._pixels, self.file = pixels, file

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:  # opened lazily, once per process
            self._pixels = np.memmap(self.file, dtype=np.uint8, mode="r")
        return self._pixels

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        shape = tuple(int(x) for x in self.shapes[i])
        start = int(self.offsets[i])
        return np.array(self.pixels[start:start + int(np.prod(shape))]).reshape(shape)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.file is not None:  # a memory map is re-opened by each worker, not copied
            state["_pixels"] = None
        return state


def _decode_all(items: list[Item], source: Source, *, channels: int, short_side: int,
                progress: bool, description: str):
    """Yield each item's resized image, in order (decoding in a few threads)."""
    def one(item: Item) -> np.ndarray:
        return resize_short_side(source.read(item, channels), short_side)

    workers = min(4, os.cpu_count() or 1)
    with Progress(console=console, disable=not progress, transient=True) as bar, \
            ThreadPoolExecutor(workers) as pool:
        task = bar.add_task(description, total=len(items))
        for image in pool.map(one, items):
            bar.advance(task)
            yield image


def _open(folder: Path, key: str, n: int) -> ImageCache | None:
    """The cache in `folder` when it is whole and made for `key`, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("key") != key or manifest.get("count") != n \
                or manifest.get("format") != FORMAT:
            return None
        with np.load(folder / "index.npz", allow_pickle=False) as z:
            offsets, shapes = z["offsets"], z["shapes"]
        total = int(manifest["bytes"])
        sizes = np.prod(shapes, axis=1) if len(shapes) else np.zeros(0, np.int64)
        if offsets.shape != (n,) or shapes.shape != (n, 3) or \
                (n and int(offsets[-1] + sizes[-1]) != total) or \
                (folder / "pixels.bin").stat().st_size != total:
            return None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        log.debug("cache %s unusable: %s", folder, e)
        return None
    return ImageCache(offsets, shapes, file=folder / "pixels.bin")


def build_cache(items: list[Item], source: Source, *, channels: int, short_side: int,
                mode: Literal["disk", "ram"], cache_dir: Path | None = None,
                progress: bool = True) -> ImageCache:
    """The cache of `items` (in order): read from `cache_dir` when valid, else built."""
    n = len(items)
    if mode == "ram":
        images = list(_decode_all(items, source, channels=channels, short_side=short_side,
                                  progress=progress, description="Decoding images into memory"))
        sizes = np.array([im.size for im in images], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        pixels = np.concatenate([im.ravel() for im in images]) if images else np.zeros(0, np.uint8)
        return ImageCache(offsets, np.array([im.shape for im in images], np.int64).reshape(n, 3),
                          pixels=pixels)
    if cache_dir is None:
        raise ValueError("a disk cache needs a cache_dir")
    key = cache_key(items, short_side=short_side, channels=channels)
    folder = Path(cache_dir) / key
    cache = _open(folder, key, n)
    if cache is not None:
        log.info("reading decoded images from the cache %s", folder)
        return cache
    if folder.exists():
        log.warning("the image cache %s is incomplete or damaged: rebuilding it", folder)
    return _write(folder, key, items, source, channels=channels, short_side=short_side,
                  progress=progress)


def check_cache_dir(items: list[Item], *, channels: int, short_side: int, cache_dir: Path, what: str) -> None:
    """Before any work: the disk cache of `items` is in `cache_dir` whole (it is only read), or
    it can be written there. `what` names the setting in the RecipeError."""
    key = cache_key(items, short_side=short_side, channels=channels)
    folder = Path(cache_dir) / key
    if _open(folder, key, len(items)) is not None:
        return
    try:
        for place in (Path(cache_dir), folder):  # the folder given first, to name it in the message
            can_make_folder(place, what=what)
    except EffftError as exc:
        raise RecipeError(f"{exc} (data.cache: disk writes the decoded images there)") from None


def _write(folder: Path, key: str, items: list[Item], source: Source, *, channels: int,
           short_side: int, progress: bool) -> ImageCache:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)  # readers see no cache while we write
    offsets, shapes, total = [], [], 0
    # the manifest is written last: a cache cut short anywhere before it is rebuilt, never read
    with atomic_write(folder / "pixels.bin") as tmp, open(tmp, "wb") as f:
        for image in _decode_all(items, source, channels=channels, short_side=short_side,
                                 progress=progress, description="Caching decoded images"):
            offsets.append(total)
            shapes.append(image.shape)
            f.write(np.ascontiguousarray(image).tobytes())
            total += image.size
    index = dict(offsets=np.array(offsets, np.int64), shapes=np.array(shapes, np.int64).reshape(len(items), 3))
    with atomic_write(folder / "index.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **index)
    manifest = {"key": key, "count": len(items), "bytes": total, "format": FORMAT,
                "short_side": short_side, "channels": channels}
    with atomic_write(folder / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    log.info("cached %d images (%.1f MB) in %s", len(items), total / 1e6, folder)
    return ImageCache(index["offsets"], index["shapes"], file=folder / "pixels.bin")

