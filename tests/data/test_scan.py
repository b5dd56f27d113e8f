"""scan finds exactly the unreadable files of a folder, by path, with reasons."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file

from effft.data.scan import format_bad_files, scan
from effft.data.sources._common import BadFile


def _mixed_folder(root: Path) -> tuple[list[str], dict[str, str]]:
    """Good and bad files; returns all paths and {bad path: expected word in the reason}."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / f"ok{i}.png")
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
        root / "ok.jpg", quality=90)
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "ok.dcm")
    jpeg = (root / "ok.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "noise.png").write_bytes(rng.bytes(2000))
    shutil.copy(get_testdata_file("MR_truncated.dcm"), root / "cut.dcm")
    bad = {str(root / "cut.jpg"): "truncated", str(root / "zero.png"): "empty",
           str(root / "noise.png"): "not an image", str(root / "cut.dcm"): "pixel data"}
    return sorted(str(p) for p in root.iterdir()), bad


def test_scan_finds_exactly_the_bad_files(tmp_path: Path) -> None:
    paths, expected = _mixed_folder(tmp_path / "data")
    bad = scan(paths, progress=False, workers=2)
    assert [b.path for b in bad] == [p for p in paths if p in expected]  # input order
    for b in bad:
        assert expected[b.path] in b.reason.lower(), (b.path, b.reason)


def test_header_only_scan_misses_truncation_but_finds_the_rest(tmp_path: Path) -> None:
    paths, expected = _mixed_folder(tmp_path / "data")
    found = {b.path for b in scan(paths, decode=False, progress=False)}
    assert str(tmp_path / "data" / "zero.png") in found
    assert str(tmp_path / "data" / "noise.png") in found
    assert str(tmp_path / "data" / "cut.jpg") not in found  # the header is intact
    assert found <= set(expected)


def test_many_files_with_progress_bar_same_result(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    tile = Image.new("L", (8, 8), 90)
    for i in range(205):
        tile.save(root / f"{i:03d}.png")
    (root / "101.png").write_bytes(b"")
    (root / "150.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    paths = sorted(str(p) for p in root.iterdir())
    bad = scan(paths, progress=True)
    assert [Path(b.path).name for b in bad] == ["101.png", "150.png"]
    assert scan(paths, progress=False, workers=1) == bad
    assert scan([], progress=False) == []


def test_format_bad_files() -> None:
    bad = [BadFile(f"/d/{i}.png", f"reason {i}") for i in range(25)]
    text = format_bad_files(bad, limit=20)
    lines = text.splitlines()
    assert lines[0] == "25 files could not be read:"
    assert lines[1] == "  /d/0.png: reason 0" and "/d/19.png: reason 19" in lines[20]
    assert "/d/20.png" not in text
    assert lines[-1].strip() == "... and 5 more"
    assert format_bad_files(bad[:1]).splitlines() == ["1 file could not be read:",
                                                       "  /d/0.png: reason 0"]
    assert format_bad_files([]) == ""
