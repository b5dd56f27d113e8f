"""read_image on every format Pillow writes, with Pillow's own conversions as the reference."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from effft.data.decode import (
    IMAGE_SUFFIXES,
    BadImageError,
    image_size,
    is_image_file,
    read_image,
)


def _rgb(w: int = 40, h: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth colour image (JPEG keeps it close) with some distinct structure."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1)
    return np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


LOSSLESS = [("png", {}), ("bmp", {}), ("tiff", {}), ("ppm", {}), ("webp", {"lossless": True}),
            ("tif", {"compression": "tiff_lzw"})]


@pytest.mark.parametrize(("ext", "kw"), LOSSLESS)
def test_lossless_rgb_round_trips_exactly(tmp_path: Path, ext: str, kw: dict) -> None:
    rgb = _rgb()
    path = tmp_path / f"img.{ext}"
    Image.fromarray(rgb).save(path, **kw)
    out = read_image(path, channels=3)
    assert out.dtype == np.uint8 and out.shape == (32, 40, 3)
    np.testing.assert_array_equal(out, rgb)
    grey = read_image(path, channels=1)
    assert grey.shape == (32, 40, 1)
    np.testing.assert_array_equal(grey[:, :, 0], _luma(rgb))  # ITU-R 601, as Pillow's "L"


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "JPG", "jpe", "webp"])
def test_lossy_rgb_is_close(tmp_path: Path, ext: str) -> None:
    rgb = _rgb()
    path = tmp_path / f"img.{ext}"
    Image.fromarray(rgb).save(path, format="JPEG" if ext.lower() != "webp" else "WEBP",
                              quality=95)
    out = read_image(path, channels=3)
    assert out.shape == (32, 40, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 4


@pytest.mark.parametrize("ext", ["png", "pgm", "bmp", "tiff", "jpg"])
def test_grey_file_repeats_to_three_channels(tmp_path: Path, ext: str) -> None:
    grey = _luma(_rgb())
    path = tmp_path / f"g.{ext}"
    Image.fromarray(grey).save(path)
    one = read_image(path, channels=1)
    three = read_image(path, channels=3)
    assert one.shape == (32, 40, 1) and three.shape == (32, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(three[:, :, c], one[:, :, 0])
    if ext != "jpg":
        np.testing.assert_array_equal(one[:, :, 0], grey)


def test_pbm_bilevel(tmp_path: Path) -> None:
    bits = np.zeros((16, 24), dtype=bool)
    bits[4:12, 6:18] = True
    Image.fromarray(bits).save(tmp_path / "b.pbm")
    out = read_image(tmp_path / "b.pbm", channels=1)[:, :, 0]
    np.testing.assert_array_equal(out, np.where(bits, 255, 0))


def test_palette_png_and_gif_first_frame(tmp_path: Path) -> None:
    rgb = (_rgb() // 64 * 64).astype(np.uint8)  # few colours: a palette holds them exactly
    pal = Image.fromarray(rgb).quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    pal.save(tmp_path / "p.png")
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expected)

    other = Image.new("RGB", (40, 32), (10, 200, 30)).quantize()
    pal.save(tmp_path / "anim.gif", save_all=True, append_images=[other])
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    np.testing.assert_array_equal(read_image(tmp_path / "anim.gif"), expected)


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 0, 0)
    rgba[:, :4, 3] = 255  # left half opaque red
    rgba[:, 4:6, 3] = 0  # fully transparent: white
    rgba[:, 6:, 3] = 128  # half: halfway between red and white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png").astype(int)
    assert (out[:, :4] == (200, 0, 0)).all()
    assert (out[:, 4:6] == 255).all()
    assert np.abs(out[:, 6:] - (228, 127, 127)).max() <= 1

    la = Image.fromarray(np.stack([np.full((8, 8), 50, np.uint8),
                                   np.where(np.arange(8) < 4, 255, 0).astype(np.uint8)[None]
                                   .repeat(8, 0)], -1), "LA")
    la.save(tmp_path / "la.png")
    g = read_image(tmp_path / "la.png", channels=1)[:, :, 0]
    assert (g[:, :4] == 50).all() and (g[:, 4:] == 255).all()


@pytest.mark.parametrize(("ext", "tol"), [("tiff", 0), ("jpg", 6)])
def test_cmyk(tmp_path: Path, ext: str, tol: int) -> None:
    cmyk = Image.fromarray(_rgb()).convert("CMYK")
    cmyk.save(tmp_path / f"c.{ext}", quality=95) if ext == "jpg" else cmyk.save(tmp_path / "c.tiff")
    assert Image.open(tmp_path / f"c.{ext}").mode == "CMYK"
    expected = np.asarray(cmyk.convert("RGB")).astype(int)
    assert np.abs(read_image(tmp_path / f"c.{ext}").astype(int) - expected).mean() <= tol


def test_16bit_grey_is_scaled_by_its_own_min_max(tmp_path: Path) -> None:
    # a 12-bit detector in a 16-bit container: full-range scaling would leave it near-black
    values = np.linspace(100, 4000, 40 * 32).reshape(32, 40).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = read_image(tmp_path / "deep.png", channels=1)[:, :, 0]
    expected = np.rint((values - 100.0) / 3900.0 * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert out.min() == 0 and out.max() == 255

    Image.fromarray(np.full((8, 8), 1234, np.uint16)).save(tmp_path / "flat.png")
    assert (read_image(tmp_path / "flat.png") == 0).all()  # constant: no range to show


def test_float_tiff_min_max(tmp_path: Path) -> None:
    values = np.linspace(-1.5, 2.5, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    out = read_image(tmp_path / "f.tif", channels=1)[:, :, 0]
    np.testing.assert_array_equal(out, np.rint((values + 1.5) / 4.0 * 255).astype(np.uint8))


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    stored = np.full((24, 40, 3), 255, np.uint8)  # 40 wide, 24 high as stored
    stored[:8, :8] = (255, 0, 0)  # red corner at the stored top-left
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif, quality=95)
    out = read_image(path)
    assert out.shape == (40, 24, 3)
    assert image_size(path) == (24, 40)
    # 6: the viewer turns it 90 degrees clockwise, the top-left goes to the top-right;
    # 8: counter-clockwise, the top-left goes to the bottom-left
    corner = out[:6, -6:] if orientation == 6 else out[-6:, :6]
    assert (np.abs(corner.astype(int) - (255, 0, 0)) < 40).all()
    assert (out[:6, :6] > 200).all() if orientation == 6 else (out[-6:, -6:] > 200).all()


def test_image_size_from_header(tmp_path: Path) -> None:
    Image.fromarray(_rgb(40, 32)).save(tmp_path / "a.png")
    assert image_size(tmp_path / "a.png") == (40, 32)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(_rgb(40, 32)).save(tmp_path / "warn.png")  # 1280 px
    Image.fromarray(_rgb(80, 64)).save(tmp_path / "err.png")  # 5120 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("warn.png", "err.png"):  # Pillow only warns for the first: refused anyway
        with pytest.raises(BadImageError, match="decompression bomb") as info:
            read_image(tmp_path / name)
        assert info.value.path == str(tmp_path / name)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    buf = tmp_path / "good.jpg"
    Image.fromarray(_rgb()).save(buf, quality=90)
    data = buf.read_bytes()
    Image.fromarray(_rgb()).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    files = {
        "empty": tmp_path / "empty.png",
        "truncated_jpeg": tmp_path / "cut.jpg",
        "truncated_png": tmp_path / "cut.png",
        "random": tmp_path / "noise.jpg",
    }
    files["empty"].write_bytes(b"")
    files["truncated_jpeg"].write_bytes(data[: len(data) // 2])
    files["truncated_png"].write_bytes(png[: len(png) // 2])
    files["random"].write_bytes(np.random.default_rng(1).bytes(3000))
    return files


def test_bad_files_raise_naming_the_path(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    for kind, path in files.items():
        with pytest.raises(BadImageError) as info:
            read_image(path)
        err = info.value
        assert err.path == str(path), kind
        assert str(path) in str(err) and err.reason in str(err)
    with pytest.raises(BadImageError, match="empty file"):
        read_image(files["empty"])
    with pytest.raises(BadImageError, match="truncated"):
        read_image(files["truncated_jpeg"])
    with pytest.raises(BadImageError, match="cannot open"):
        read_image(tmp_path / "missing.png")


def test_is_image_file(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "notes.txt", "labels.csv",
                 ".hidden.png", "._photo.jpg", "README"):
        (tmp_path / name).write_bytes(b"x" * 200)
        assert not is_image_file(tmp_path / name), name
    for name in ("a.jpg", "B.JPG", "c.Png", "d.tiff", "e.dcm", "f.webp", "g.pgm"):
        assert is_image_file(tmp_path / name), name
    dicom_no_suffix = tmp_path / "IM0001"
    dicom_no_suffix.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    assert is_image_file(dicom_no_suffix)
    assert read_image(dicom_no_suffix).shape == (128, 128, 3)
    assert {".jpg", ".png", ".dcm", ".dicom", ".gif", ".pnm"} <= IMAGE_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)


def test_channels_must_be_1_or_3(tmp_path: Path) -> None:
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    with pytest.raises(ValueError):
        read_image(tmp_path / "a.png", channels=4)


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="permissions not enforced")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    Image.fromarray(_rgb()).save(path)
    path.chmod(0)
    try:
        with pytest.raises(BadImageError):
            read_image(path)
    finally:
        path.chmod(0o644)
