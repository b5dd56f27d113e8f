"""The decoded-image cache: same pixels as decoding, rebuilt when stale or damaged."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from effft.data.cache import build_cache, cache_key, resize_short_side
from effft.data.sources import folder


def make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    sizes = [(60, 40), (30, 80), (20, 20), (100, 50)]  # w, h: some below the short side
    for i, (w, h) in enumerate(sizes):
        cls = "a" if i % 2 else "b"
        (root / cls).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / cls / f"{i}.png")


@pytest.fixture
def source(tmp_path):
    make_folder(tmp_path / "data")
    return folder.load(tmp_path / "data", folder.Options(), channels=3)


def test_resize_short_side_reference():
    img = np.random.default_rng(1).integers(0, 256, (40, 100, 1), dtype=np.uint8)
    out = resize_short_side(img, 20)
    assert out.shape == (20, 50, 1)
    ref = cv2.resize(img[:, :, 0], (50, 20), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out[:, :, 0], ref)
    assert resize_short_side(img, 64) is img  # never enlarged
    assert resize_short_side(np.zeros((90, 30, 3), np.uint8), 10).shape == (30, 10, 3)


@pytest.mark.parametrize("mode", ["disk", "ram"])
@pytest.mark.parametrize("channels", [1, 3])
def test_cache_equals_decode_and_resize(source, tmp_path, mode, channels):
    cache = build_cache(source.items, source, channels=channels, short_side=30, mode=mode,
                        cache_dir=tmp_path / "cache", progress=False)
    assert len(cache) == len(source.items)
    for i, item in enumerate(source.items):
        expected = resize_short_side(source.read(item, channels), 30)
        got = cache[i]
        assert got.dtype == np.uint8 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    small = [i for i, it in enumerate(source.items) if it.path.endswith("2.png")][0]
    assert cache[small].shape[:2] == (20, 20)  # the 20x20 image was not enlarged


def test_disk_cache_is_reused(source, tmp_path, monkeypatch):
    build_cache(source.items, source, channels=3, short_side=30, mode="disk",
                cache_dir=tmp_path / "cache", progress=False)
    calls = []
    monkeypatch.setattr(type(source), "read", lambda self, it, ch: calls.append(it))
    again = build_cache(source.items, source, channels=3, short_side=30, mode="disk",
                        cache_dir=tmp_path / "cache", progress=False)
    assert calls == []  # nothing decoded the second time
    assert again[0].shape[2] == 3
    # in a data loader worker: pickled without the memory map, reopened on use
    copy = pickle.loads(pickle.dumps(again))
    assert copy._pixels is None
    np.testing.assert_array_equal(copy[3], again[3])


def test_stale_cache_rebuilt_after_mtime_change(source, tmp_path):
    key = cache_key(source.items, short_side=30, channels=3)
    build_cache(source.items, source, channels=3, short_side=30, mode="disk",
                cache_dir=tmp_path / "cache", progress=False)
    path = Path(source.items[0].path)
    new = np.full((50, 50, 3), 7, np.uint8)
    Image.fromarray(new).save(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new_key = cache_key(source.items, short_side=30, channels=3)
    assert new_key != key
    cache = build_cache(source.items, source, channels=3, short_side=30, mode="disk",
                        cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(cache[0], np.full((30, 30, 3), 7, np.uint8))
    assert (tmp_path / "cache" / new_key / "manifest.json").is_file()
    # the key also changes with the short side and channels
    assert cache_key(source.items, short_side=31, channels=3) != new_key
    assert cache_key(source.items, short_side=30, channels=1) != new_key


@pytest.mark.parametrize("damage", ["truncate", "manifest", "index", "no_manifest", "key"])
def test_damaged_cache_rebuilt(source, tmp_path, damage, caplog):
    args = dict(channels=3, short_side=30, mode="disk", cache_dir=tmp_path / "cache",
                progress=False)
    good = build_cache(source.items, source, **args)
    expected = [good[i].copy() for i in range(len(good))]
    del good
    folder_ = tmp_path / "cache" / cache_key(source.items, short_side=30, channels=3)
    if damage == "truncate":
        data = (folder_ / "pixels.bin").read_bytes()
        (folder_ / "pixels.bin").write_bytes(data[: len(data) // 2])
    elif damage == "manifest":
        (folder_ / "manifest.json").write_text("{not json")
    elif damage == "index":
        (folder_ / "index.npz").write_bytes(b"PK\x03\x04 broken")
    elif damage == "no_manifest":
        (folder_ / "manifest.json").unlink()
    else:
        manifest = json.loads((folder_ / "manifest.json").read_text())
        (folder_ / "manifest.json").write_text(json.dumps({**manifest, "key": "other"}))
    cache = build_cache(source.items, source, **args)
    assert "rebuilding" in caplog.text
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(cache[i], e)
    assert (folder_ / "pixels.bin").stat().st_size == sum(e.size for e in expected)
    assert not list(folder_.glob("*.tmp-*"))  # temporary files renamed into place
